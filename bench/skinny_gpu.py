"""A/B of the small-batch quantized kernels on the GPU: per decoder layer of the
Llama-3.1-8B shape (qkv, o, gate_up, down), for M rows, the CUDA-core kernels
(w4a16.py GEMV (M <= 8) / GEMM, fp8_gemv.py (M <= 8) / torch._scaled_mm W8A8) against the
tensor-core skinny kernels (skinny_dot.py), beside bf16 cuBLAS. Four distinct layers' weights are chained in
one CUDA graph (their weights exceed L2, as in a decode step), timed per layer.

  PYTHONPATH=$PWD python bench/skinny_gpu.py [--rows 1 16 64] [--configs] [--mma-configs] [--nvfp4]

--nvfp4 adds NVFP4's kernels (the tuned GEMVs / fused GEMM, the skinny kernel, the
dequantization + bf16 GEMM) to the table, and to --skinny-configs (format "nvfp4") and
--mma-configs. --skinny-max-rows N lets the skinny kernels take up to N rows (their 64-row
tiles side by side; the engine dequantizes above 64) for A/Bs at 65-256 rows; --kernels
keeps the table to the named kernels (and bf16).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources
from gpu_timing import capture, graph_replay_ms

from ember.quant.fp8 import quantize_fp8
from ember.quant.int4 import pack_int4, quantize_int4
from ember.quant.kernels import fp8_linear_ref, int4_linear_ref
from ember.quant.kernels.fp8_gemv import CONFIGS as FP8_GEMV_CONFIGS
from ember.quant.kernels.fp8_gemv import fp8_gemv_triton
from ember.quant.kernels.skinny_dot import FP8_CONFIGS as FP8_SKINNY_CONFIGS
from ember.quant.kernels.skinny_dot import INT4_CONFIGS as INT4_SKINNY_CONFIGS
from ember.quant.kernels.skinny_dot import NVFP4_CONFIGS as NVFP4_SKINNY_CONFIGS
from ember.quant.kernels import skinny_dot
from ember.quant.kernels.skinny_dot import fp8_skinny, int4_skinny, nvfp4_skinny
from ember.quant.kernels.w4a16 import (INT4_GEMV_CONFIGS, int4_dequant_triton, int4_linear_triton,
                                       nvfp4_dequant_triton, nvfp4_linear_triton)
from ember.quant.kernels import nvfp4_linear_ref
from ember.quant.nvfp4_format import quantize_nvfp4

# (warps, SPLIT_K, UNROLL, SUB, AHEAD) of the tensor-core INT4 GEMV (kernels/int4_mma.py)
MMA_SWEEP = ([("mma", w, s, u, 0, a) for w in (2, 4, 8) for s in (1, 2, 4) for u in (1, 2, 4) for a in (0, 2)]
             + [("mma", w, 1, u, 1, 0) for w in (2, 4) for u in (1, 2, 4)])

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
LAYERS = 4


def layer_weights(seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        q, s, z = quantize_int4(w, 128)
        f8, s8 = quantize_fp8(w, per_row=True)
        p4, b4, g4 = quantize_nvfp4(w)
        out[name] = {"bf16": w.to(torch.bfloat16), "int4": (pack_int4(q), s.to(torch.bfloat16), z),
                     "fp8": (f8, s8.reshape(-1).contiguous()),
                     "nvfp4": (p4, b4, g4.reshape(-1)[:1].expand(n).contiguous().float())}
        del w
    return out


def fp8_w8a8(x, w, s):
    q, sx = quantize_fp8(x, True)
    return torch._scaled_mm(q, w.t(), scale_a=sx, scale_b=s.reshape(1, -1), out_dtype=torch.bfloat16)


KERNELS = {
    "bf16": lambda x, w: F.linear(x, w["bf16"]),
    "int4-gemv/gemm": lambda x, w: int4_linear_triton(x, *w["int4"]),
    "int4-skinny": lambda x, w: int4_skinny(x, *w["int4"]),
    "int4-dequant+bf16": lambda x, w: F.linear(x, int4_dequant_triton(*w["int4"], x.dtype)),
    "fp8-gemv/w8a8": lambda x, w: fp8_gemv_triton(x, *w["fp8"]) if x.shape[0] <= 8 else fp8_w8a8(x, *w["fp8"]),
    "fp8-skinny": lambda x, w: fp8_skinny(x, *w["fp8"]),
}
NVFP4_KERNELS = {     # with --nvfp4
    "nvfp4-gemv/gemm": lambda x, w: nvfp4_linear_triton(x, *w["nvfp4"]),
    "nvfp4-skinny": lambda x, w: nvfp4_skinny(x, *w["nvfp4"]),
    "nvfp4-dequant+bf16": lambda x, w: F.linear(x, nvfp4_dequant_triton(*w["nvfp4"], x.dtype)),
}


def applies(kernel: str, m: int) -> bool:
    """The skinny kernels serve at most skinny_dot.MAX_ROWS rows (--skinny-max-rows)."""
    return "skinny" not in kernel or m <= skinny_dot.MAX_ROWS


def time_layers(fn, xs: dict, layers: list, shapes=tuple(SHAPES)) -> float:
    """Microseconds per layer of fn over `shapes` of every layer, graph-replayed."""
    def step():
        for w in layers:
            for name in shapes:
                fn(xs[name], w[name])
    g = capture(step, 1, warmup=2)
    return graph_replay_ms(g, 20) * 1e3 / len(layers)


def check(layers: list, m: int, kernels: dict) -> None:
    w = layers[0]["gate_up"]
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    int4_ref = int4_linear_ref(x.float(), w["int4"][0], w["int4"][1].float(), w["int4"][2])
    refs = {"int4-gemv/gemm": int4_ref, "int4-skinny": int4_ref, "fp8-gemv/w8a8": fp8_linear_ref(x.float(), *w["fp8"]),
            "fp8-skinny": fp8_linear_ref(x.float(), *w["fp8"])}
    if "nvfp4-skinny" in kernels:
        nvfp4_ref = nvfp4_linear_ref(x.float(), *w["nvfp4"])
        refs.update({"nvfp4-gemv/gemm": nvfp4_ref, "nvfp4-skinny": nvfp4_ref, "nvfp4-dequant+bf16": nvfp4_ref})
    for name, ref in refs.items():
        if name not in kernels or (name == "fp8-gemv/w8a8" and m > 8) or not applies(name, m):
            continue   # W8A8 quantizes x too: not the weight-only reference
        y = kernels[name](x, w).float()
        err = ((y - ref).norm() / ref.norm()).item()
        print(json.dumps({"check": name, "m": m, "rel_err": err}), flush=True)
        assert err < 2e-2, (name, m, err)


def per_config(fn, fmt: str, configs, xs: dict, layers: list, name: str) -> str:
    """Microseconds per layer of shape `name` for every tile config of fn (weights w[fmt])."""
    cells = []
    for c in configs:
        try:
            us = time_layers(lambda xx, w, c=c: fn(xx, *w[fmt], config=c), xs, layers, (name,))
            cells.append(f"{c}: {us:.1f}")
        except OutOfResources:
            cells.append(f"{c}: out of shared memory")
    return ", ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--configs", action="store_true", help="also time every GEMV tile config at M=1")
    ap.add_argument("--config-formats", nargs="*", default=["int4", "fp8"],
                    help="with --configs, which formats' GEMV tiles to time")
    ap.add_argument("--ahead", type=int, nargs="*", default=[],
                    help="with --configs, each FP8 GEMV tile also with these L2 prefetch distances (AHEAD)")
    ap.add_argument("--mma-configs", action="store_true",
                    help="also time every tensor-core INT4 GEMV config at each of --rows up to 8")
    ap.add_argument("--skinny-configs", action="store_true",
                    help="also time every skinny tile config (INT4 and FP8) at each of --rows in 2..64")
    ap.add_argument("--skinny-formats", nargs="*", default=["int4", "fp8"],
                    help="with --skinny-configs, which formats' skinny tiles to time (int4, fp8, nvfp4)")
    ap.add_argument("--nvfp4", action="store_true", help="NVFP4's kernels too")
    ap.add_argument("--skinny-max-rows", type=int, default=None,
                    help="let the skinny kernels take up to this many rows (64-row tiles side by side)")
    ap.add_argument("--kernels", nargs="*", default=None, help="only these kernels of the table (bf16 always)")
    args = ap.parse_args()
    if args.skinny_max_rows:
        skinny_dot.MAX_ROWS = args.skinny_max_rows
    kernels = dict(KERNELS, **(NVFP4_KERNELS if args.nvfp4 else {}))
    if args.kernels is not None:
        kernels = {k: v for k, v in kernels.items() if k == "bf16" or k in args.kernels}
    print("#", json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    layers = [layer_weights(i) for i in range(LAYERS)]
    rows = []
    for m in args.rows:
        check(layers, m, kernels)
        xs = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (k, n) in SHAPES.items()}
        for kname, fn in kernels.items():
            if not applies(kname, m):
                continue
            us = time_layers(fn, xs, layers)
            rows.append({"m": m, "kernel": kname, "us_per_layer": round(us, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| M | " + " | ".join(kernels) + " |")
    print("| --- | " + " | ".join("---" for _ in kernels) + " |")
    for m in args.rows:
        base = next(r["us_per_layer"] for r in rows if r["m"] == m and r["kernel"] == "bf16")
        got = {r["kernel"]: r["us_per_layer"] for r in rows if r["m"] == m}
        cells = [f"{got[k]:.1f} us ({base / got[k]:.2f}x)" if k in got else "-" for k in kernels]
        print(f"| {m} | " + " | ".join(cells) + " |")
    from quant_gpu import tuned_tiles
    print("# tiles the kernels' tuner chose:", tuned_tiles(), flush=True)
    if args.skinny_configs:
        for m in [m for m in args.rows if 2 <= m <= 64]:
            x = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (k, n) in SHAPES.items()}
            for fmt, cfgs, fn in (("int4", INT4_SKINNY_CONFIGS, int4_skinny), ("fp8", FP8_SKINNY_CONFIGS, fp8_skinny),
                                  ("nvfp4", NVFP4_SKINNY_CONFIGS, nvfp4_skinny)):
                if fmt not in args.skinny_formats:
                    continue
                for name in SHAPES:
                    print(f"# {fmt}-skinny {name} M={m} us per config: "
                          + per_config(fn, fmt, cfgs, x, layers, name), flush=True)
    if args.mma_configs:
        for m in [m for m in args.rows if m <= 8]:
            x = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (k, n) in SHAPES.items()}
            for fmt, fn in (("int4", int4_linear_triton), ("nvfp4", nvfp4_linear_triton)):
                if fmt == "nvfp4" and not args.nvfp4:
                    continue
                for name in SHAPES:
                    print(f"# {fmt}-mma {name} M={m} us per config: "
                          + per_config(fn, fmt, MMA_SWEEP, x, layers, name), flush=True)
    if args.configs:
        x = {name: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for name, (k, n) in SHAPES.items()}
        def ahead(cfgs):
            return [tuple(c) + (0,) * (5 - len(c)) + (a,) for a in args.ahead for c in cfgs]
        for fmt, cfgs, fn in (("int4", INT4_GEMV_CONFIGS, int4_linear_triton),
                              ("fp8", list(FP8_GEMV_CONFIGS) + ahead(FP8_GEMV_CONFIGS), fp8_gemv_triton)):
            if fmt not in args.config_formats:
                continue
            for name in SHAPES:
                print(f"# {fmt} {name} M=1 us per config: " + per_config(fn, fmt, cfgs, x, layers, name), flush=True)


if __name__ == "__main__":
    main()
