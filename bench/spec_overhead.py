"""Per-step bookkeeping cost of speculation when adaptive k is 0: a tiny random model (so
Python bookkeeping dominates a step), 64 requests x 64 tokens, none vs ngram with k forced
to 0, alternating, three repeats.

  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/spec_overhead.py
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "tests")  # the tiny checkpoint builder
import torch

torch.set_num_threads(1)
from conftest import _build_checkpoint, random_prompts

from ember import LLM, SamplingParams

ck = _build_checkpoint("llama-gqa", Path(tempfile.mkdtemp()))
prompts = [{"prompt_token_ids": p} for p in random_prompts([16] * 64, seed=1)]
p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
# k forced to 0: a controller that never speculates isolates the bookkeeping cost.
llms = {"none": LLM(ck.path, dtype="float32", num_kv_blocks=2048, block_size=16),
        "ngram-k0": LLM(ck.path, dtype="float32", num_kv_blocks=2048, block_size=16,
                        speculative_config={"method": "ngram", "num_speculative_tokens": 3})}
llms["ngram-k0"].engine.speculator.controller.choose = lambda b: 0
for rep in range(3):
    for name, llm in llms.items():
        t = time.perf_counter(); llm.generate(prompts, p, use_tqdm=False); dt = time.perf_counter() - t
        print(f"{rep} {name:9s} {dt:.3f} s  {dt / 64 * 1000:.2f} ms/step", flush=True)
