"""Speed on a noisy shared CPU: several speculation variants in one process, interleaved
(every variant once per repeat, for each batch size), greedy, 24 output tokens per prompt
from held-out passages. A variant is `none`, `METHOD-adaptive` (adaptive k up to --k) or
`METHOD-kN` (N drafts every step); the spread across repeats says how noisy it was.

  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/spec_decode_interleaved.py [--batch-sizes 1,8] \
      [--repeats 2] [--variants none,ngram-adaptive,draft-adaptive] [--draft DIR] [--mtp DIR]
      [--eagle DIR --peagle DIR]   (variants eagle-k3, eagle-tree-adaptive, peagle-tree-k3, ...;
      peagle-hosttree-kN: P-EAGLE trees built on the host even for greedy requests)
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_decode as sd

from ember import SamplingParams

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--batch-sizes", default="1,8")
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--variants", default="none,ngram-adaptive,draft-adaptive")
ap.add_argument("--k", type=int, default=3, help="the most drafts per step for adaptive variants")
ap.add_argument("--draft", default="/tmp/spec/draft-smollm2-2l")
ap.add_argument("--mtp", default=None)
ap.add_argument("--eagle", default=None)
ap.add_argument("--peagle", default=None)
ap.add_argument("--tree-top-k", type=int, default=3)
ap.add_argument("--tree-budget", type=int, default=10)
ap.add_argument("--b1-prompts", type=int, default=1,
                help="batch 1 decodes this many prompts one after another (1: the first prompt only, "
                     "whose acceptance then decides the figure)")
ap.add_argument("--output-len", type=int, default=24)
ap.add_argument("--data", nargs="+", default=sd.DATA, help="the texts whose held-out part gives the prompts")
cli = ap.parse_args()
args = argparse.Namespace(model="smollm2-135m", dtype="auto", device=None, load_format="auto", prompt_len=64,
                          output_len=cli.output_len, quality_output_len=cli.output_len, enforce_eager=False,
                          gpu_memory_utilization=0.8, k=cli.k, draft=cli.draft, mtp=cli.mtp,
                          eagle=cli.eagle, peagle=cli.peagle, tree_top_k=cli.tree_top_k,
                          tree_budget=cli.tree_budget)


def build(variant: str):
    if variant == "none":
        return sd.make_llm(args, None)
    method, mode = variant.rsplit("-", 1)
    if mode == "adaptive":
        return sd.make_llm(args, sd.spec_config(method, args, True))
    fixed = argparse.Namespace(**dict(vars(args), k=int(mode[1:])))
    return sd.make_llm(fixed, sd.spec_config(method, fixed, False))


variants = cli.variants.split(",")
llms = {v: build(v) for v in variants}
prompts = sd.held_out_prompts(next(iter(llms.values())).get_tokenizer(), cli.data, max(64, cli.b1_prompts), 64, 0.8)
p = SamplingParams(temperature=0, max_tokens=cli.output_len, ignore_eos=True)
for llm in llms.values():
    sd.generate(llm, prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))
sizes = [int(b) for b in cli.batch_sizes.split(",")]
tput: dict[tuple[str, int], list[float]] = {}
outputs: dict[tuple[str, int], list] = {}
for rep in range(cli.repeats):
    for b in sizes:
        # Batch 1 over --b1-prompts prompts in turn; a larger batch over its first b prompts.
        groups = [prompts[i:i + 1] for i in range(cli.b1_prompts)] if b == 1 else [prompts[:b]]
        n = len(groups) * b * cli.output_len
        for name, llm in llms.items():
            runs = [sd.generate(llm, g, p) for g in groups]
            s, out = sum(t for t, _ in runs), [o for _, outs in runs for o in outs]
            tput.setdefault((name, b), []).append(n / s)
            outputs.setdefault((name, b), out)
            print(f"repeat {rep} batch {b} {name:15s} {s:6.2f} s {n / s:6.1f} tok/s", flush=True)
for b in sizes:
    base = statistics.median(tput[("none", b)]) if ("none", b) in tput else None
    for name in variants:
        t = tput[(name, b)]
        same = outputs[(name, b)] == outputs[(variants[0], b)]
        ratio = f"x{statistics.median(t) / base:.2f} vs none" if base else ""
        print(f"batch {b} {name:15s} median {statistics.median(t):6.1f} tok/s (min {min(t):.1f}, max {max(t):.1f}) "
              f"{ratio} greedy-identical {same}", flush=True)
for name, llm in llms.items():
    if name != "none":
        st = llm.engine.spec_stats()
        print(name, "k-hist", st["k_histogram"], "acceptance per position",
              [round(x, 3) for x in st["acceptance_rate_per_position"]],
              "mean accepted length", round(st["mean_accepted_length"], 2))
