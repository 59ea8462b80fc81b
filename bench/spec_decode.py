"""Speculative decoding: acceptance on held-out text, and speed vs no speculation.

Prompts are passages from the held-out part (last 20%) of each data file, cut to
--prompt-len tokens; every run generates --output-len tokens per prompt (EOS ignored,
greedy unless --temperature), so all methods produce the same number of tokens (and,
greedy, the same tokens: checked).

  quality: for each method, all held-out prompts at once with k fixed: acceptance rate
           per draft position, mean accepted length (tokens per verification).
  speed:   output tokens/s at each --batch-sizes for none, and each method with adaptive k
           (the default) and with k fixed; the ratio to none is the speedup.

Example (CPU):
  python bench/spec_decode.py --draft /tmp/spec/draft-smollm2-2l --batch-sizes 1,8,64
  python bench/spec_decode.py --methods mtp --mtp /work/mtp-smollm2 --k 2 --skip-speed
  python bench/spec_decode.py --methods eagle,eagle-tree,peagle,peagle-tree --eagle /work/eagle-smollm2 \
      --peagle /work/peagle-smollm2 --skip-speed
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import torch

from ember import LLM, SamplingParams

DATA = ["/work/shared/data/tinystories_sample.txt", "/work/shared/data/wizard_of_oz.txt"]


def held_out_prompts(tokenizer, files: list[str], n: int, prompt_len: int,
                     train_fraction: float) -> list[list[int]]:
    """n prompts of prompt_len tokens, alternating files, from each file's held-out tail."""
    streams = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        streams.append(tokenizer.encode(text[int(len(text) * train_fraction):]))
    prompts, offsets = [], [0] * len(streams)
    stride = prompt_len * 3   # spread prompts over the held-out text
    while len(prompts) < n:
        i = len(prompts) % len(streams)
        ids = streams[i]
        start = offsets[i] % max(1, len(ids) - prompt_len)
        prompts.append(ids[start:start + prompt_len])
        offsets[i] += stride
    return prompts


def spec_config(method: str, args: argparse.Namespace, adaptive: bool) -> dict | None:
    if method == "none":
        return None
    cfg = {"method": method, "num_speculative_tokens": args.k, "adaptive": adaptive}
    if method == "draft":
        cfg["model"] = args.draft
    if method == "mtp":
        cfg["model"] = args.mtp
    base = method.removesuffix("-tree").removesuffix("-hosttree")
    if base in ("eagle", "peagle"):   # METHOD-tree: the same drafter, EAGLE-2 trees of depth k
        cfg.update(method=base, model=getattr(args, base))
        if method.endswith("tree"):
            cfg["tree"] = {"top_k": args.tree_top_k, "budget": args.tree_budget}
        if method.endswith("-hosttree"):   # peagle-hosttree: greedy trees built on the host too
            cfg["tree"]["device_greedy"] = False
    return cfg


def make_llm(args: argparse.Namespace, spec: dict | None) -> LLM:
    # Room past the last token for a full draft (a tree's budget): a request's last steps
    # then draft the shapes every other step does (a context cut to the output would shrink
    # them: new shapes, eager verify steps, captures).
    room = max(getattr(args, "tree_budget", 0) or 0, getattr(args, "k", 0) or 0) + 1
    return LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
               max_model_len=args.prompt_len + max(args.output_len, args.quality_output_len) + 16 + room,
               max_num_seqs=256,
               speculative_config=spec, enforce_eager=args.enforce_eager,
               gpu_memory_utilization=args.gpu_memory_utilization)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", default=None, help="draft model folder (ember train-draft output)")
    ap.add_argument("--mtp", default=None, help="MTP folder (ember train-mtp output)")
    ap.add_argument("--eagle", default=None, help="EAGLE-3 drafter folder (methods eagle, eagle-tree)")
    ap.add_argument("--peagle", default=None, help="P-EAGLE drafter folder (methods peagle, peagle-tree)")
    ap.add_argument("--tree-top-k", type=int, default=3, help="children per expanded node (-tree methods)")
    ap.add_argument("--tree-budget", type=int, default=10, help="most tree nodes (-tree methods)")
    ap.add_argument("--methods", default="ngram,draft")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--data", nargs="+", default=DATA)
    ap.add_argument("--train-fraction", type=float, default=0.8)
    ap.add_argument("--num-quality-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--quality-output-len", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--speed-modes", default="adaptive,fixed", help="adaptive and/or fixed k")
    ap.add_argument("--fixed-batch-sizes", default=None,
                    help="batch sizes for the fixed-k runs (default: --batch-sizes)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                    help="CUDA: the target's KV pool sizing does not count the draft's KV; leave room")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON results here")
    args = ap.parse_args()
    paths = {"draft": args.draft, "mtp": args.mtp, "eagle": args.eagle, "peagle": args.peagle}
    methods = [m for m in args.methods.split(",")
               if m and (m.removesuffix("-tree") not in paths or paths[m.removesuffix("-tree")])]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True,
                            seed=0 if args.temperature > 0 else None)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} | {platform.node()} | "
          f"{platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
    print("# " + " ".join(sys.argv))
    results: dict = {"args": vars(args), "quality": {}, "speed": []}

    base = make_llm(args, None)
    tok = base.get_tokenizer()
    n_prompts = max(args.num_quality_prompts, max(batch_sizes))
    prompts = held_out_prompts(tok, args.data, n_prompts, args.prompt_len, args.train_fraction)
    generate(base, prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up

    if not args.skip_quality:
        qp = prompts[:args.num_quality_prompts]
        qparams = SamplingParams(temperature=args.temperature, max_tokens=args.quality_output_len,
                                 ignore_eos=True, seed=0 if args.temperature > 0 else None)
        _, ref = generate(base, qp, qparams)
        for m in methods:
            llm = make_llm(args, spec_config(m, args, adaptive=False))
            _, got = generate(llm, qp, qparams)
            st = llm.engine.spec_stats()
            st["greedy_identical"] = got == ref if args.temperature == 0 else None
            results["quality"][m] = st
            print(f"quality {m}: k={args.k} acceptance {st['acceptance_rate']:.3f} per position "
                  f"{[round(x, 3) for x in st['acceptance_rate_per_position']]} mean accepted length "
                  f"{st['mean_accepted_length']:.2f} drafted {st['num_draft_tokens']} accepted "
                  f"{st['num_accepted_tokens']} greedy-identical {st['greedy_identical']}", flush=True)
            del llm
            gc.collect()

    variants = []
    if not args.skip_speed:
        variants.append(("none", None, None))
        variants += [(m, mode, spec_config(m, args, adaptive=(mode == "adaptive")))
                     for m in methods for mode in args.speed_modes.split(",")]
    base_tput: dict[int, float] = {}
    for name, mode, spec in variants:
        llm = base if spec is None else make_llm(args, spec)
        generate(llm, prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))  # warm up
        sizes = batch_sizes
        if mode == "fixed" and args.fixed_batch_sizes:
            sizes = [int(b) for b in args.fixed_batch_sizes.split(",")]
        for b in sizes:
            batch = prompts[:b]
            seconds, _ = generate(llm, batch, params)
            tput = b * args.output_len / seconds
            if spec is None:
                base_tput[b] = tput
            st = llm.engine.spec_stats() if spec is not None else {}
            row = {"method": name, "mode": mode, "batch": b, "seconds": seconds, "tok_per_s": tput,
                   "speedup": tput / base_tput[b], "k_histogram": st.get("k_histogram"),
                   "acceptance_rate": st.get("acceptance_rate")}
            results["speed"].append(row)
            print(f"speed {name:5s} {mode or '-':8s} batch {b:3d}: {seconds:7.2f} s {tput:8.1f} tok/s "
                  f"x{row['speedup']:.2f} vs none  k-hist(cumulative) {row['k_histogram']}", flush=True)
        if spec is not None:
            del llm
            gc.collect()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
