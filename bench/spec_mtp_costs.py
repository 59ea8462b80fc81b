"""Where an MTP speculation step's time goes at batch 1 (CPU): a target forward over 1, 2
and 3 query tokens after a 64-token context (a decode with k = 0, 1, 2 drafts), the MTP
block over 1 and 2 rows (the hidden-state hook), and the MTP's LM head on one row (a draft).
Median of 30 runs each, interleaved.

  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/spec_mtp_costs.py /work/mtp-smollm2
"""
import statistics
import sys
import time

import torch

from ember import LLM
from ember.engine.model_runner import build_forward_batch

llm = LLM("smollm2-135m", max_model_len=256,
          speculative_config={"method": "mtp", "model": sys.argv[1], "num_speculative_tokens": 2})
runner = llm.engine.runner
mtp = llm.engine.speculator.proposer.mtp
blocks = list(range(8))
ids = list(range(100, 167))
with torch.inference_mode():   # the 64-token context, in the target's and the MTP's KV
    fb = build_forward_batch([(blocks, 0, ids[:64])], runner.block_size, runner.device)
    runner.backend.prepare(fb)
    hidden = runner.model(fb.input_ids, fb.positions, fb)
    mtp(fb.input_ids, fb.positions, hidden, fb)


def target(n: int) -> None:
    fb = build_forward_batch([(blocks, 64, ids[64:64 + n])], runner.block_size, runner.device)
    runner.backend.prepare(fb)
    h = runner.model(fb.input_ids, fb.positions, fb)
    runner.model.compute_logits(h)


def block(n: int) -> None:
    fb = build_forward_batch([(blocks, 64, ids[64:64 + n])], runner.block_size, runner.device)
    runner.backend.prepare(fb)
    mtp(fb.input_ids, fb.positions, hidden[:n], fb)


cases = {"target forward, 1 token": lambda: target(1), "target forward, 2 tokens": lambda: target(2),
         "target forward, 3 tokens": lambda: target(3), "MTP block, 1 row": lambda: block(1),
         "MTP block, 2 rows": lambda: block(2), "MTP head, 1 row": lambda: mtp.compute_logits(hidden[:1])}
times: dict[str, list[float]] = {name: [] for name in cases}
with torch.inference_mode():
    for _ in range(30):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
base = statistics.median(times["target forward, 1 token"])
for name, ts in times.items():
    m = statistics.median(ts)
    print(f"{name:26s} median {m * 1e3:7.2f} ms  ({m / base:.2f} x a 1-token forward; min {min(ts) * 1e3:.2f}, max {max(ts) * 1e3:.2f})")
