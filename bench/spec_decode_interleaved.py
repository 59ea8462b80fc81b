"""Recheck of the CPU speed figures on a noisy shared machine: none, ngram and draft
(adaptive k) interleaved in one process, two repeats, batch 1 and 8, 24 output tokens.

  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/spec_decode_interleaved.py [BATCH,...] [REPEATS]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_decode as sd

from ember import SamplingParams

args = argparse.Namespace(model="smollm2-135m", dtype="auto", device=None, load_format="auto", prompt_len=64,
                          output_len=24, quality_output_len=24, enforce_eager=False, gpu_memory_utilization=0.8,
                          k=3, draft="/tmp/spec/draft-smollm2-2l")
base = sd.make_llm(args, None)
prompts = sd.held_out_prompts(base.get_tokenizer(), sd.DATA, 64, 64, 0.8)
ng = sd.make_llm(args, sd.spec_config("ngram", args, True))
dr = sd.make_llm(args, sd.spec_config("draft", args, True))
p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
for llm in (base, ng, dr):
    sd.generate(llm, prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))
sizes = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
for rep in range(repeats):
    for b in sizes:
        for name, llm in (("none", base), ("ngram-adaptive", ng), ("draft-adaptive", dr)):
            s, _ = sd.generate(llm, prompts[:b], p)
            print(f"repeat {rep} batch {b} {name:15s} {s:6.2f} s {b*24/s:6.1f} tok/s", flush=True)
print("ngram", ng.engine.spec_stats()["k_histogram"], "draft", dr.engine.spec_stats()["k_histogram"])
