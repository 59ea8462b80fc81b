"""Triton kernel: write new MLA latent rows (c_kv, then k_pe) into the paged latent cache.

Torch reference: `ember.attention.mla_ref.write_latent_cache`. Unlike the reference, a
negative slot (a padded row of a CUDA-graph batch) writes nothing; plain indexing would
wrap it around to the pool's last slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _latent_write_kernel(c_ptr, pe_ptr, cache_ptr, slot_ptr, num_tokens,
                         stride_ct, stride_pt, stride_slot,
                         RANK: tl.constexpr, ROPE: tl.constexpr,
                         RANK_P2: tl.constexpr, ROPE_P2: tl.constexpr, BLOCK_T: tl.constexpr):
    # One program per BLOCK_T tokens: [BLOCK_T, R] latent and [BLOCK_T, P] rope rows.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    live = (slot >= 0)[:, None]
    t2 = t[:, None].to(tl.int64)
    dst = cache_ptr + slot[:, None] * stride_slot
    r = tl.arange(0, RANK_P2)[None, :]
    c = tl.load(c_ptr + t2 * stride_ct + r, mask=live & (r < RANK))
    tl.store(dst + r, c.to(cache_ptr.dtype.element_ty), mask=live & (r < RANK))
    p = tl.arange(0, ROPE_P2)[None, :]
    pe = tl.load(pe_ptr + t2 * stride_pt + p, mask=live & (p < ROPE))
    tl.store(dst + RANK + p, pe.to(cache_ptr.dtype.element_ty), mask=live & (p < ROPE))


def write_latent_cache_triton(cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                              slot_mapping: torch.Tensor) -> None:
    """cache: [num_blocks, block_size, R + P]; c_kv: [T, R]; k_pe: [T, P]; slot_mapping: [T]
    (-1 = padding, skipped). No host synchronization (CUDA-graph safe)."""
    t, rank = c_kv.shape
    rope = k_pe.shape[1]
    if t == 0:
        return
    assert c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1 and cache.is_contiguous()
    rank_p2, rope_p2 = triton.next_power_of_2(rank), triton.next_power_of_2(rope)
    # ~4k elements a program on the GPU; in the CPU interpreter every op costs about the
    # same whatever its size, so fewer, larger programs.
    block_t = triton.next_power_of_2(max(1, (4096 if c_kv.is_cuda else 16384) // rank_p2))
    _latent_write_kernel[(triton.cdiv(t, block_t),)](
        c_kv, k_pe, cache, slot_mapping, t, c_kv.stride(0), k_pe.stride(0), cache.stride(1),
        RANK=rank, ROPE=rope, RANK_P2=rank_p2, ROPE_P2=rope_p2, BLOCK_T=block_t, num_warps=4)
