"""Where one request's first token goes, per quantization format (H200, dummy Llama-3.1-8B).

    PYTHONPATH=$PWD python3 bench/prefill_profile.py --methods bf16 fp8 --prompt-len 128

For each format:
(a) the first token of one P-token prompt as `LLM.generate(max_tokens=1)` serves it: wall
    time, the median and minimum of --reps runs after three warm-up runs;
(b) one such run under torch.profiler: device kernel time, launch count and the top kernels;
(c) with --ab, the same first-token timing with PDL off (EMBER_PDL=0) and with Python's
    garbage collector frozen and off, in the same process; with --cprofile, the host
    functions of one run by own time (cProfile);
(d) with --gemm-rows, the W8A8 pieces at each Llama-8B layer shape and row count, as CUDA
    graph replays (device time) and as eager calls (host launch time included): bf16
    F.linear, FP8 activation quantization, torch._scaled_mm with row-wise scales, and
    torch._scaled_mm with per-tensor scales.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quant_gpu import SHAPES_8B, use_variant  # noqa: E402


def first_token_runs(llm, prompt_len: int, reps: int) -> list[float]:
    """Wall ms of `reps` one-token generations of a fresh random prompt each."""
    from ember import SamplingParams
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.model_config.vocab_size
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=1)
    out = []
    for _ in range(reps):
        ids = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def profile_first_token(llm, prompt_len: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first_token_runs(llm, prompt_len, 1)
    dev: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            dev[e.name].append(e.device_time_total / 1e3)
    total = sum(sum(v) for v in dev.values())
    print(f"  device kernels: {total:.2f} ms in {sum(len(v) for v in dev.values())} launches")
    for name, times in sorted(dev.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"    {sum(times):8.3f} ms  x{len(times):<4d} {name[:110]}")


def ab_runs(llm, prompt_len: int, reps: int) -> None:
    """First-token medians under host-side variants, one process, one model; per run also
    the host time spent launching the model's forward (the rest is scheduling, sampling
    and the wait for the device), and per variant the garbage collections and the CUDA
    allocator's device allocations / retries."""
    import gc
    model = llm.engine.runner.model
    launch_ms: list[float] = []
    inner = model.forward

    def timed_forward(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            launch_ms.append((time.perf_counter() - t) * 1e3)
    model.forward = timed_forward
    variants = [("as is", {}, False), ("EMBER_PDL=0", {"EMBER_PDL": "0"}, False),
                ("gc frozen + off", {}, True), ("as is, again", {}, False)]
    for name, env, no_gc in variants:
        old = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        if no_gc:
            gc.collect()
            gc.freeze()
            gc.disable()
        launch_ms.clear()
        collections = [st["collections"] for st in gc.get_stats()]
        mem = torch.cuda.memory_stats()
        try:
            ms = first_token_runs(llm, prompt_len, reps)
        finally:
            if no_gc:
                gc.enable()
                gc.unfreeze()
            for key, val in old.items():
                os.environ.pop(key) if val is None else os.environ.__setitem__(key, val)
        mem2 = torch.cuda.memory_stats()
        gcs = [st["collections"] - c for st, c in zip(gc.get_stats(), collections)]
        print(f"  {name:16s} median {statistics.median(ms):6.1f} ms, min {min(ms):6.1f} "
              f"({', '.join(f'{m:.1f}' for m in ms)}); forward launch ms "
              f"({', '.join(f'{m:.1f}' for m in launch_ms)}); gc collections by generation {gcs}; "
              f"cudaMalloc {mem2['num_device_alloc'] - mem['num_device_alloc']}, retries "
              f"{mem2['num_alloc_retries'] - mem['num_alloc_retries']}", flush=True)
    del model.forward


def host_profile(llm, prompt_len: int, top: int) -> None:
    import cProfile
    import io
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    first_token_runs(llm, prompt_len, 1)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000])


def gemm_pieces(rows: int) -> None:
    """us per call of the W8A8 pieces at each Llama-8B layer shape (graph / eager)."""
    from gpu_timing import capture, graph_replay_ms
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels.fp8_quant import quantize_fp8_rows

    def both(fn) -> str:
        g = capture(fn, 10)
        graph_us = graph_replay_ms(g, 20) * 100
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        return f"{graph_us:7.1f} / {(time.perf_counter() - t) * 2e4:7.1f}"

    print(f"\n| rows {rows}: us per call, graph / eager | bf16 F.linear | FP8 quantize x | "
          "_scaled_mm row-wise | _scaled_mm per-tensor |")
    print("| --- | --- | --- | --- | --- |")
    for name, (k, n) in SHAPES_8B.items():
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, sw = quantize_fp8(w, True)
        sw_row = sw.reshape(1, -1)
        qx, sx = quantize_fp8_rows(x)
        one = torch.ones((), device="cuda")
        cols = [both(lambda: F.linear(x, w)),
                both(lambda: quantize_fp8_rows(x)),
                both(lambda: torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw_row,
                                              out_dtype=torch.bfloat16)),
                both(lambda: torch._scaled_mm(qx, qw.t(), scale_a=one, scale_b=one,
                                              out_dtype=torch.bfloat16))]
        print(f"| {name} | " + " | ".join(cols) + " |", flush=True)
        del w, qw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama-3.1-8b/config.json")
    ap.add_argument("--methods", nargs="+", default=["bf16", "fp8"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--ab", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--gemm-rows", type=int, nargs="*", default=[])
    args = ap.parse_args()
    from ember import LLM
    for method in args.methods:
        llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=1,
                  max_model_len=4096, quantization=use_variant(method), prefix_cache="none")
        first_token_runs(llm, args.prompt_len, 3)
        ms = first_token_runs(llm, args.prompt_len, args.reps)
        print(f"\n== {method}: first token of a {args.prompt_len}-token prompt: median "
              f"{statistics.median(ms):.1f} ms, min {min(ms):.1f} ms "
              f"({', '.join(f'{m:.1f}' for m in ms)})", flush=True)
        if args.top:
            profile_first_token(llm, args.prompt_len, args.top)
        if args.ab:
            ab_runs(llm, args.prompt_len, args.reps)
        if args.cprofile:
            host_profile(llm, args.prompt_len, 25)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for rows in args.gemm_rows:
        gemm_pieces(rows)


if __name__ == "__main__":
    main()
