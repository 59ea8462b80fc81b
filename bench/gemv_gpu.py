"""Batch-1 linear layers on a GPU: ember's Triton GEMV against cuBLAS (F.linear).

    PYTHONPATH=$PWD python3 bench/gemv_gpu.py [--sweep]

Llama-3.1-8B decode shapes, bf16, one activation row. Correctness against F.linear first,
then times replayed from CUDA graphs (`triton.testing.do_bench_cudagraph`, as decode runs),
reported as TB/s of weight read. --sweep tries every tile config and prints the best.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from ember.layers.triton_gemv import DEFAULT_CONFIG, GemvConfig, gemv  # noqa: E402

SHAPES = {"qkv 4096->6144": (6144, 4096), "o 4096->4096": (4096, 4096),
          "gate_up 4096->28672": (28672, 4096), "down 14336->4096": (4096, 14336),
          "lm_head 4096->128256": (128256, 4096)}


def tbs(n: int, k: int, ms: float) -> float:
    return n * k * 2 / ms / 1e9


def time_ms(fn) -> float:
    return min(do_bench_cudagraph(fn, rep=100) for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    configs = [DEFAULT_CONFIG]
    if args.sweep:
        configs = [GemvConfig(bn, bk, w) for bn, bk, w in
                   itertools.product((4, 8, 16), (256, 512, 1024), (2, 4, 8))]
    best_total: dict[GemvConfig, float] = {c: 0.0 for c in configs}
    cublas_total = 0.0
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), w.float())
        err = ((gemv(x, w).float() - ref).norm() / ref.norm()).item()
        err_cublas = ((F.linear(x, w).float() - ref).norm() / ref.norm()).item()
        t_cublas = time_ms(lambda: F.linear(x, w))
        cublas_total += t_cublas
        results = []
        for c in configs:
            t = time_ms(lambda c=c: gemv(x, w, config=c))
            best_total[c] += t
            results.append((t, c))
        results.sort(key=lambda r: r[0])
        t_best, c_best = results[0]
        t_def = next(t for t, c in results if c == DEFAULT_CONFIG) if DEFAULT_CONFIG in configs else None
        print(f"{name:22s} rel err {err:.1e} (cuBLAS {err_cublas:.1e}) | cuBLAS {t_cublas * 1e3:7.1f} us "
              f"{tbs(n, k, t_cublas):.2f} TB/s | triton best {t_best * 1e3:7.1f} us {tbs(n, k, t_best):.2f} TB/s "
              f"{c_best} | ratio {t_cublas / t_best:.2f}x"
              + (f" | default {tbs(n, k, t_def):.2f} TB/s" if t_def else ""))
    best = min(best_total, key=best_total.get)
    print(f"sum over the five shapes: cuBLAS {cublas_total * 1e3:.1f} us; best single config {best} "
          f"{best_total[best] * 1e3:.1f} us ({cublas_total / best_total[best]:.2f}x)")


if __name__ == "__main__":
    main()
