"""One launch of each small-batch quantized kernel (INT4 register-decoder GEMV tiles, INT4
skinny tiles, FP8 GEMV) and of its bf16 peer at a Llama-3.1-8B shape, between
cudaProfilerStart/Stop, for Nsight Compute to read its counters:

  ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
      python3 bench/ncu_gemv.py --shape gate_up --int4 32,256,4,4 128,128,8,4
  ... python3 bench/ncu_gemv.py --shape down --rows 64 --skinny 64,128,4,4,1 --bf16

Each kernel is compiled and run once before the profiled range.
"""
from __future__ import annotations

import argparse

import torch

from ember.layers.triton_gemv import gemv
from ember.quant.fp8 import quantize_fp8
from ember.quant.int4 import pack_int4, quantize_int4
from ember.quant.kernels.fp8_gemv import fp8_gemv_triton
from ember.quant.kernels.skinny_dot import int4_skinny
from ember.quant.kernels.w4a16 import int4_linear_triton

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gate_up", choices=SHAPES)
    ap.add_argument("--int4", nargs="*", default=[], help="INT4 GEMV tiles as BN,BK,SPLIT,WARPS[,PREFETCH]")
    ap.add_argument("--fp8", nargs="*", default=[], help="FP8 GEMV tiles as BN,BK,SPLIT,WARPS")
    ap.add_argument("--skinny", nargs="*", default=[], help="INT4 skinny tiles as BN,BK,SPLIT,WARPS[,FOLD[,PREFETCH]]")
    ap.add_argument("--bf16", action="store_true", help="the bf16 peer: Triton GEMV at one row, else cuBLAS")
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()
    k, n = SHAPES[args.shape]
    w = torch.randn(n, k, device="cuda") * 0.02
    q, s, z = quantize_int4(w, 128)
    int4 = (pack_int4(q), s.to(torch.bfloat16), z)
    f8, s8 = quantize_fp8(w, per_row=True)
    wb = w.to(torch.bfloat16)
    del w
    x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
    tile = lambda c: tuple(map(int, c.split(",")))  # noqa: E731
    calls = [(f"int4 {c}", lambda c=c: int4_linear_triton(x, *int4, config=tile(c))) for c in args.int4]
    calls += [(f"int4 skinny {c}", lambda c=c: int4_skinny(x, *int4, config=tile(c))) for c in args.skinny]
    calls += [(f"fp8 {c}", lambda c=c: fp8_gemv_triton(x, f8, s8.reshape(-1), config=tile(c))) for c in args.fp8]
    if args.bf16:
        calls.append(("bf16", lambda: gemv(x, wb) if args.rows == 1 else torch.nn.functional.linear(x, wb)))
    for _, fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in calls:
        print("launch:", name, flush=True)
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
