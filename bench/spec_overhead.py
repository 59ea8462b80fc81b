"""Per-step cost of having speculation configured when adaptive k is 0: a tiny random
model (so Python bookkeeping and small ops dominate a step), 64 requests x 64 tokens, none
vs each proposer with k forced to 0 (ngram; MTP and EAGLE-3 with random drafters, which
read the target's hidden states through the runner's hook), alternating, --repeats times.
Prints each variant's median step time and the time spent inside the speculator's
per-step calls and the hook (the overhead itself, less exposed to a busy machine's noise).

  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/spec_overhead.py [--variants none,ngram-k0,mtp-k0,eagle-k0]
      [--async-scheduling auto|on|off]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "tests")  # the tiny checkpoint builder and the random drafters of the tests
import torch

torch.set_num_threads(1)
from conftest import _build_checkpoint, random_prompts

from ember import LLM, SamplingParams
from ember.config import ModelConfig

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--variants", default="none,ngram-k0,mtp-k0,eagle-k0")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"])
cli = ap.parse_args()

root = Path(tempfile.mkdtemp())
ck = _build_checkpoint("llama-gqa", root)
config = ModelConfig.from_file(os.path.join(ck.path, "config.json"))


def spec_config(variant: str) -> dict | None:
    if variant == "none":
        return None
    method = variant.split("-")[0]
    cfg = {"method": method, "num_speculative_tokens": 3}
    if method == "mtp":
        from _spec_helpers import random_mtp_tensors

        from ember.spec.mtp import save_mtp_checkpoint
        cfg["model"] = str(root / "mtp")
        save_mtp_checkpoint(cfg["model"], random_mtp_tensors(ck, seed=7), config)
    elif method in ("eagle", "peagle"):
        from test_eagle_proposer import _random_drafter_for
        cfg["model"] = _random_drafter_for(config, str(root / method), 64, parallel=method == "peagle")
    return cfg




def time_spec_calls(llm: LLM) -> dict[str, float]:
    """Wrap the speculator's per-step entry points and the runner's hidden-state hook with
    timers: {"seconds": time inside them, "steps": engine steps}."""
    acc = {"seconds": 0.0, "steps": 0}

    def timed(fn, count_step=False):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            acc["seconds"] += time.perf_counter() - t
            acc["steps"] += count_step
            return out
        return wrapper
    sp, runner = llm.engine.speculator, llm.engine.runner
    sp.plan = timed(sp.plan)
    sp.propose = timed(sp.propose)
    sp.launched = timed(sp.launched)
    sp.observe = timed(sp.observe, count_step=True)
    if runner.hidden_states_hook is not None:
        runner.hidden_states_hook = timed(runner.hidden_states_hook)
    return acc


prompts = [{"prompt_token_ids": p} for p in random_prompts([16] * 64, seed=1)]
p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
llms = {}
for v in cli.variants.split(","):
    llms[v] = LLM(ck.path, dtype="float32", num_kv_blocks=2048, block_size=16, speculative_config=spec_config(v),
                  async_scheduling=cli.async_scheduling)
    if v != "none":   # k forced to 0: a controller that never speculates isolates the cost
        llms[v].engine.speculator.controller.choose = lambda b: 0
spent = {name: time_spec_calls(llm) for name, llm in llms.items()}
outputs, times = {}, {name: [] for name in llms}
for rep in range(cli.repeats):
    for name, llm in llms.items():
        t = time.perf_counter()
        outs = llm.generate(prompts, p, use_tqdm=False)
        dt = time.perf_counter() - t
        outputs[name] = [o.outputs[0].token_ids for o in outs]
        times[name].append(dt / 64 * 1000)
        print(f"{rep} {name:9s} {dt:.3f} s  {dt / 64 * 1000:.2f} ms/step", flush=True)
for name, ts in times.items():
    acc = spent[name]
    print(f"{name:9s} ms/step median {statistics.median(ts):.2f} min {min(ts):.2f} max {max(ts):.2f}; "
          f"in the speculator and the hook: {acc['seconds'] / max(acc['steps'], 1) * 1e6:.0f} us/step")
ref = outputs.get("none")
if ref is not None:
    print("greedy identical to none:", {n: o == ref for n, o in outputs.items() if n != "none"})
