"""Where the time of one speculative decoding step goes (EAGLE / P-EAGLE chains and trees).

    PYTHONPATH=$PWD python3 bench/profile_spec_step.py [--batch-sizes 1 8] \
        [--variants none none-eager eagle-tree-k3 peagle-tree-k3 peagle-hosttree-k3 peagle-k3]

The target is SmolLM2-135M's shape with dummy bf16 weights (bench/configs/smollm2-135m); the
drafters are random EAGLE-3 / P-EAGLE networks of the real drafters' shape (draft vocabulary
8,192), so every step drafts a full chain or tree of the fixed k (adaptive k off) and the
cost of a step does not depend on acceptance. With `--model smollm2-135m --real --eagle DIR
--peagle DIR --data TEXT...` the real target and drafters decode held-out prompts instead,
so the steps also do what accepted drafts cost (catch-up rows, the tree's K/V moves, more
output tokens); each block then reports the tokens a step emitted. Per variant and batch size:
(a) wall ms per engine step and host ms per step in each phase (patched timers; GPU work is
    asynchronous, so a phase's time is its launches plus any wait for the device inside it);
(b) a few steps under torch.profiler: device ms per step (the sum of kernel times), kernel
    launches per step, and host-device syncs (cudaStreamSynchronize / DtoH copies) per step.
`none` is plain decoding with CUDA graphs; `none-eager` the same without graphs;
`peagle-hosttree-kN` builds P-EAGLE's greedy trees on the host (`"device_greedy": false`).
`--tree-block-m / --tree-block-n / --tree-warps` override the Triton tree kernel's tiles.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))   # the tests' random drafter builder

import torch  # noqa: E402

from ember import LLM  # noqa: E402
from ember.config import ModelConfig  # noqa: E402
from profile_step import start_decoding, stop_all, timed  # noqa: E402

CONFIG = os.path.join(HERE, "configs", "smollm2-135m", "config.json")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def patch_timers(llm: LLM, acc: dict[str, float]) -> Callable[[], None]:
    """Wrap the step's phases with host timers; returns the undo."""
    import ember.engine.model_runner as model_runner
    import ember.spec.eagle_proposer as eagle_proposer
    from ember.spec.tree import TreeBuilder
    eng = llm.engine
    runner, sp = eng.runner, eng.speculator
    prop = sp.proposer
    patched: list[tuple[Any, str, str]] = [
        (eng.scheduler, "schedule", "schedule"), (sp, "propose", "propose (all)"),
        (eagle_proposer, "catch_up", "  draft: catch-up"),
        (prop, "_mask_rows", "  draft: mask rows"), (prop, "_expand_levels", "  draft: tree levels"),
        (prop, "_chains", "  draft: chains"), (prop, "_trees", "  draft: trees"),
        (TreeBuilder, "expand", "    tree: expand"), (TreeBuilder, "finish", "    tree: finish"),
        (runner, "launch", "launch (all)"), (model_runner, "tree_layout", "  tree layout"),
        (model_runner, "build_forward_batch", "  build batch"), (runner.model, "forward", "  target forward"),
        (runner, "_verify", "  verify chains"), (runner, "_verify_trees", "  verify trees"),
        (runner, "_verify_device_trees", "  verify device trees"), (prop, "_device_trees", "  draft: device trees"),
        (runner, "_move_rows", "    tree KV moves"),
        (runner, "_sample", "  sample"), (runner, "_hand_hidden_states", "  hidden hook"),
        (model_runner.LaunchedStep, "resolve", "resolve"), (eng.scheduler, "update", "update"),
        (sp, "observe", "observe"), (eng.output_processor, "process", "process"),
    ]
    if runner.graph_runner is not None:
        patched.append((runner.graph_runner, "run", "  graph replay"))
    undo = []
    for obj, attr, name in patched:
        if not hasattr(obj, attr):
            continue
        fn = getattr(obj, attr)
        had_own = attr in vars(obj) if not isinstance(obj, type) else True
        undo.append((obj, attr, fn, had_own))
        setattr(obj, attr, timed(fn, name, acc))

    def restore() -> None:
        for obj, attr, fn, had_own in reversed(undo):
            if had_own:
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)
    return restore


def host_breakdown(llm: LLM, steps: int) -> tuple[float, dict[str, float]]:
    acc: dict[str, float] = defaultdict(float)
    restore = patch_timers(llm, acc)
    times = []
    try:
        sync()
        for _ in range(steps):
            t = time.perf_counter()
            llm.engine.step()
            times.append(time.perf_counter() - t)
        sync()
    finally:
        restore()
    return 1e3 * statistics.median(times), {k: 1e3 * v / steps for k, v in acc.items()}


def device_profile(llm: LLM, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    llm.engine.step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.engine.step()
        sync()
    kernel_ms, launches, syncs, dtoh = 0.0, 0, 0, 0
    top: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            dev_us = getattr(ev, "self_device_time_total", 0)
            kernel_ms += dev_us / 1e3
            launches += ev.count
            top[ev.key[:60]] += dev_us / 1e3
        else:
            if "Synchronize" in ev.key:
                syncs += ev.count
            if ev.key in ("cudaMemcpyAsync", "cudaMemcpy"):
                dtoh += ev.count
    out = {"device ms/step": kernel_ms / steps, "kernels/step": launches / steps,
           "syncs/step": syncs / steps, "memcpy calls/step": dtoh / steps}
    for name, ms in sorted(top.items(), key=lambda kv: -kv[1])[:8]:
        out[f"  top: {name}"] = ms / steps
    return out


def python_profile(llm: LLM, steps: int, top: int = 30) -> str:
    """`steps` engine steps under cProfile: the host functions by own time (tottime), the
    Python behind the host share of a step."""
    import cProfile
    import io
    import pstats
    llm.engine.step()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        llm.engine.step()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def spec_config(variant: str, root: str, config: ModelConfig, tree_shape: dict,
                drafters: dict[str, str | None]) -> dict | None:
    if variant.startswith("none"):
        return None
    from test_eagle_proposer import _random_drafter_for
    method, rest = variant.split("-", 1)
    tree = rest.startswith(("tree-", "hosttree-"))   # hosttree: P-EAGLE greedy trees built on the host
    k = int(rest.split("k")[-1])
    folder = drafters.get(method) or os.path.join(root, method)
    if not os.path.isdir(folder):
        _random_drafter_for(config, folder, 8192, parallel=method == "peagle")
    cfg = {"method": method, "model": folder, "num_speculative_tokens": k, "adaptive": False}
    if tree:
        cfg["tree"] = dict(tree_shape, **({"device_greedy": False} if rest.startswith("host") else {}))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=CONFIG)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+",
                    default=["none", "none-eager", "eagle-tree-k3", "peagle-tree-k3", "peagle-k3"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tree-block-m", type=int, default=None,
                    help="the Triton tree kernel's rows per program (default: the backend's)")
    ap.add_argument("--tree-block-n", type=int, default=None, help="the tree kernel's key tile width")
    ap.add_argument("--tree-warps", type=int, default=None, help="the tree kernel's warps")
    ap.add_argument("--tree-top-k", type=int, default=3)
    ap.add_argument("--tree-budget", type=int, default=10)
    ap.add_argument("--cprofile", type=int, default=0,
                    help="also run this many steps under cProfile and print the top functions")
    ap.add_argument("--real", action="store_true", help="the model's own weights (not dummy ones)")
    ap.add_argument("--eagle", default=None, help="a trained EAGLE-3 drafter (else a random one)")
    ap.add_argument("--peagle", default=None, help="a trained P-EAGLE drafter (else a random one)")
    ap.add_argument("--data", nargs="+", default=None,
                    help="texts whose held-out part gives the prompts (else random token ids)")
    args = ap.parse_args()
    tree_tiles = {f: getattr(args, f) for f in ("tree_block_m", "tree_block_n", "tree_warps")
                  if getattr(args, f) is not None}
    if tree_tiles:
        import dataclasses

        import ember.attention.triton_backend as tb
        tb.CUDA_CONFIG = dataclasses.replace(tb.CUDA_CONFIG, **tree_tiles)
    from ember.models.loader import resolve_model
    config = resolve_model(args.model).config if args.real else ModelConfig.from_file(args.model)
    root = tempfile.mkdtemp()
    drafters = {"eagle": args.eagle, "peagle": args.peagle}
    print(f"# {args.model}, {'its own' if args.real else 'dummy'} bf16 weights, drafters "
          f"{ {m: d or 'random' for m, d in drafters.items()} }, prompts {'from ' + str(args.data) if args.data else 'random'}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}")
    prompts = None
    for variant in args.variants:
        spec = spec_config(variant, root, config, {"top_k": args.tree_top_k, "budget": args.tree_budget}, drafters)
        llm = LLM(args.model, load_format="auto" if args.real else "dummy", dtype="bfloat16", max_model_len=2048,
                  max_num_seqs=max(args.batch_sizes), prefix_cache="none",
                  enforce_eager=variant == "none-eager", speculative_config=spec)
        if args.data and prompts is None:
            from spec_decode import held_out_prompts
            prompts = held_out_prompts(llm.get_tokenizer(), args.data, max(args.batch_sizes), args.prompt_len, 0.8)
        for bs in args.batch_sizes:
            start_decoding(llm, bs, args.prompt_len, prompts)
            emitted = sum(r.num_output_tokens for r in llm.engine.scheduler.running)
            wall, phases = host_breakdown(llm, args.steps)
            emitted = sum(r.num_output_tokens for r in llm.engine.scheduler.running) - emitted
            dev = device_profile(llm, args.profile_steps)
            py = python_profile(llm, args.cprofile) if args.cprofile else ""
            stop_all(llm, bs)
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
            print(f"\n## {variant}, batch {bs}: {wall:.2f} ms per step (median of {args.steps}), "
                  f"{emitted / (args.steps * bs):.2f} tokens a step per request")
            for name, ms in phases.items():
                print(f"  {name:32s} {ms:8.3f} ms")
            for name, v in dev.items():
                print(f"  {name:32s} {v:8.3f}")
            if py:
                print(f"  cProfile, {args.cprofile} steps:\n{py}")
        del llm


if __name__ == "__main__":
    main()
