"""A Triton GEMV for batch-1 decode: y = x W^T (+ b) with one activation row.

At batch 1 a linear layer is a pure weight stream: each weight is read once and used once,
so the kernel's only job is to keep enough loads in flight to saturate HBM. Each program
owns BLOCK_N output rows and walks the whole K dimension in BLOCK_K chunks, accumulating
elementwise products in a [BLOCK_N, BLOCK_K] fp32 tile and reducing once at the end;
weights are loaded with evict-first (they will not be reused). No split-K: the decode
shapes have N >= 2048, which gives enough programs on their own.

Torch reference: `F.linear` (fp32 accumulation, one rounding to the output dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ember.layers.pdl import pdl_launch


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


DEFAULT_CONFIG = GemvConfig(block_n=8, block_k=512, num_warps=4)


def choose_config(n: int, k: int) -> GemvConfig:
    """Tiles by shape, from the H200 sweep of bench/gemv_gpu.py at Llama-3.1-8B shapes
    (bench/results/h200_2026-11-29b_gemv_sweep.txt): wide outputs like many narrow rows
    with short K tiles; long K likes few rows with long tiles and few warps."""
    if n >= 16384:
        return GemvConfig(16, 256, 4)
    if k >= 8192:
        return GemvConfig(4, 1024, 2)
    if n <= 4096:
        return GemvConfig(8, 512, 8)
    return GemvConfig(4, 1024, 2)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if PDL:
        # Launched early (ember.layers.pdl): the first weight tile is requested before
        # waiting for the kernel that writes x. (PDL launches only with EVEN_K.)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptr + rk)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        k_start = BLOCK_K
    else:
        k_start = 0
    for k in range(k_start, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k + rk)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_mask = k + rk < K
            x = tl.load(x_ptr + k + rk, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x: [1, K] (or [K]); weight: [N, K] with unit stride along K -> [1, N] (or [N])."""
    assert weight.stride(1) == 1 and x.shape[-1] == weight.shape[1]
    n, k = weight.shape
    config = config or choose_config(n, k)
    xv = x.reshape(-1)
    assert xv.numel() == k, "gemv takes a single activation row"
    xv = xv.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    even_k = k % config.block_k == 0
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        xv, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=even_k,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        **(pdl_launch(x) if even_k else {"PDL": False}))
    return out.view(*x.shape[:-1], n)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
