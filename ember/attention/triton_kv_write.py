"""Triton kernel: write new K/V into the paged cache through the slot mapping.

Torch reference: `ember.attention.torch_ref.write_kv`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.layers.pdl import pdl_launch


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_slot, stride_c_head,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:   # launched early (ember.layers.pdl): wait for the kernel before, let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # One program per BLOCK_T new tokens, all of their kv heads at once: [BLOCK_T, heads, d].
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_mask, other=-1).to(tl.int64)
    t3 = t[:, None, None].to(tl.int64)
    h = tl.arange(0, HEADS_P2)[None, :, None]
    d = tl.arange(0, DIM_P2)[None, None, :]
    # A negative slot marks a padded token (fixed-size CUDA-graph batches): write nothing.
    mask = (slot >= 0)[:, None, None] & (h < KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t3 * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t3 * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + slot[:, None, None] * stride_c_slot + h * stride_c_head + d
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, blocks, block_size, kv_heads, d]; k, v: [T, kv_heads, d]; slot_mapping: [T]."""
    t, kvh, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    # Slots index (block, offset) as one flat dimension.
    assert kv_cache.stride(1) == kv_cache.shape[2] * kv_cache.stride(2)
    heads_p2, dim_p2 = triton.next_power_of_2(kvh), triton.next_power_of_2(d)
    # About 2k elements a program on the GPU; in the CPU interpreter every op costs ~1 ms
    # whatever its size, so fewer, larger programs.
    block_t = triton.next_power_of_2(max(1, (2048 if k.is_cuda else 16384) // (heads_p2 * dim_p2)))
    _kv_write_kernel[(triton.cdiv(t, block_t),)](
        k, v, kv_cache, slot_mapping, t,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        KV_HEADS=kvh, HEAD_DIM=d, HEADS_P2=heads_p2, DIM_P2=dim_p2, BLOCK_T=block_t,
        num_warps=4, **pdl_launch(k),
    )
