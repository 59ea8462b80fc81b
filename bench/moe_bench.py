"""The routed experts of a MoE layer: per-token reference vs grouped GEMMs vs the Triton kernel.

    python bench/moe_bench.py --device cuda                       # H200: bf16, T in 1 64 256 2048
    python bench/moe_bench.py --device cpu --tokens 1 16 64 --threads 1   # CPU: fp32
    TRITON_INTERPRET=1 python bench/moe_bench.py --device cpu --hidden 64 --intermediate 32 \
        --experts 8 --top-k 2 --tokens 1 5 --reps 1 --impls reference grouped triton   # plumbing

DeepSeek-V2-Lite shapes by default (H 2048, 64 experts, top 6, I 1408), random weights,
routing from a random router (near-uniform over the experts). Times only the experts
(routing is the same for all); each implementation's output is checked against the
reference first (relative error ||out - ref|| / ||ref||). Prints ms per call, the speedup
over the reference, and the weight bytes of the experts hit per second (decode is a weight
stream). On CUDA the Triton path is also timed replayed from a CUDA graph (it never syncs
with the host, so it can be captured; the grouped path reads per-expert counts and cannot).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from ember.layers.moe_experts import GroupedExperts, MoEExperts, ReferenceExperts
from ember.layers.moe_router import grouped_topk_route


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds per call after two warm calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], reps: int) -> float:
    """Milliseconds per replay of a CUDA graph capturing one call of fn."""
    from gpu_timing import graph_replay_ms
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph_replay_ms(graph, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 2048])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--reps", type=int, default=None, help="default: 50 on CUDA, 5 on the CPU")
    ap.add_argument("--ref-max-tokens", type=int, default=None,
                    help="skip the per-token reference above this many tokens "
                         "(default: none on CUDA, 256 on the CPU)")
    ap.add_argument("--impls", nargs="+", choices=["reference", "grouped", "triton"], default=None,
                    help="default: all three on CUDA, reference and grouped on the CPU "
                         "(triton on the CPU needs TRITON_INTERPRET=1: a plumbing check only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (on a CPU shared with other jobs, 1 avoids OpenMP thrashing)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    reps = args.reps or (50 if cuda else 5)
    ref_max = args.ref_max_tokens if args.ref_max_tokens is not None else (1 << 30 if cuda else 256)
    h, e, k, i = args.hidden, args.experts, args.top_k, args.intermediate

    g = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device=device) * 0.02).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g, device=device) * 0.02).to(dtype)
    gate = torch.randn(e, h, generator=g, device=device) * 0.02
    names = args.impls or (["reference", "grouped", "triton"] if cuda else ["reference", "grouped"])
    impls: dict[str, MoEExperts] = {}
    for name in names:
        if name == "triton":
            from ember.layers.triton_moe import TritonExperts
            impls[name] = TritonExperts()
        else:
            impls[name] = ReferenceExperts() if name == "reference" else GroupedExperts()
    bytes_per_expert = 3 * i * h * w13.element_size()

    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# MoE experts, {dev_name}, {dtype}, H {h}, E {e}, top {k}, I {i}, "
          f"torch {torch.__version__}, median of {reps}")
    print(f"{'T':>6} {'impl':>14} {'ms':>10} {'vs ref':>8} {'GB/s':>8} {'rel err':>9}")
    for t in args.tokens:
        x = torch.randn(t, h, generator=g, device=device).to(dtype)
        weights, ids = grouped_topk_route(x, gate, None, k, 1, 1, True, 1.0)
        hit = ids.unique().numel()
        ref_out, ref_ms = None, None
        results: list[tuple[str, Callable[[], torch.Tensor]]] = []
        for name, impl in impls.items():
            if name == "reference" and t > ref_max:
                continue
            results.append((name, lambda impl=impl, x=x, weights=weights, ids=ids: impl.forward(x, w13, w2, weights, ids)))
        if cuda and results and results[-1][0] == "triton":
            results.append(("triton+graph", results[-1][1]))
        for name, fn in results:
            out = fn()
            if name == "reference":
                ref_out = out.float()
            err = ((out.float() - ref_out).norm() / ref_out.norm()).item() if ref_out is not None else float("nan")
            if name.endswith("+graph"):
                try:
                    ms = graph_ms(fn, reps)
                except RuntimeError as exc:  # report and go on: the eager figures still stand
                    print(f"{t:>6} {name:>14} capture failed: {type(exc).__name__}: {exc}", flush=True)
                    continue
            else:
                # The reference syncs once per token: a few calls say enough.
                ms = time_ms(fn, device, min(reps, 3) if name == "reference" else reps)
            if name == "reference":
                ref_ms = ms
            speed = f"{ref_ms / ms:7.1f}x" if ref_ms is not None else f"{'-':>8}"
            gbs = hit * bytes_per_expert / ms / 1e6
            print(f"{t:>6} {name:>14} {ms:>10.3f} {speed} {gbs:>8.1f} {err:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
