"""Triton tree attention over the paged KV cache (tree verification and tree drafting).

A tree sequence's n new tokens (already written to the cache) are the last n of its
seq_len slots; each sees every slot before the last w (w >= n) and, of the last w, those
its row of the mask allows (ember.engine.forward_batch.ForwardBatch.attn_masks). A program
owns BLOCK_M queries of one sequence for one query head: it streams the visible prefix in
unmasked tiles through the block table (as the prefill kernel does), then the last w slots
with the mask, keeping an online softmax.

Torch reference: `ember.spec.tree.tree_attention_ref` (and the torch backend's chunk path).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ember.attention.triton_common import LOG2E, dot_flags
from ember.attention.triton_prefill import _load_rows, _online_softmax_step, _prefix_tile

TREE_TILE_FIELDS = 6  # seq, first row in q, n (queries), tile offset, mask offset, w


@triton.jit
def _tree_kernel(
    q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, tiles_ptr, mask_ptr, out_ptr, scale_log2,
    stride_qt, stride_qh, stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
    PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = h // GROUP
    base = tiles_ptr + tile * 6
    seq = tl.load(base)
    q_begin = tl.load(base + 1)
    n = tl.load(base + 2)
    m0 = tl.load(base + 3)
    mask_off = tl.load(base + 4).to(tl.int64)
    w = tl.load(base + 5)
    seq_len = tl.load(seq_lens_ptr + seq)
    head = seq_len - w   # slots every query sees

    offs_m = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_P2)
    d_mask = d < HEAD_DIM
    m_mask = offs_m < n
    rows_q = (q_begin + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows_q[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    cache_base = cache_ptr + kvh * stride_c_head

    # 1. The slots before the masked ones: all visible.
    head_whole = head - head % BLOCK_N
    for n0 in range(0, head_whole, BLOCK_N):
        m_i, l_i, acc = _prefix_tile(q, m_i, l_i, acc, n0, head, table_row, cache_base, stride_c_kv,
                                     stride_c_block, stride_c_slot, d, d_mask, scale_log2,
                                     BLOCK_SIZE, BLOCK_N, False, PAD_D, PRECISION, UPCAST)
    for n0 in range(head_whole, head, BLOCK_N):
        m_i, l_i, acc = _prefix_tile(q, m_i, l_i, acc, n0, head, table_row, cache_base, stride_c_kv,
                                     stride_c_block, stride_c_slot, d, d_mask, scale_log2,
                                     BLOCK_SIZE, BLOCK_N, True, PAD_D, PRECISION, UPCAST)
    # 2. The last w slots, through the mask.
    for n0 in range(0, w, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)   # index among the last w
        valid = j < w
        pos = head + j
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot
        ptrs = cache_base + rows[:, None] + d[None, :]
        k = _load_rows(ptrs, valid, d_mask, True, PAD_D).to(q.dtype)
        v = _load_rows(ptrs + stride_c_kv, valid, d_mask, True, PAD_D).to(q.dtype)
        bits = tl.load(mask_ptr + mask_off + offs_m[:, None].to(tl.int64) * w + j[None, :],
                       mask=m_mask[:, None] & valid[None, :], other=0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, scale_log2, bits != 0,
                                             PRECISION, UPCAST, True)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows_q[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def build_tree_tiles(query_start_loc: list[int], masks: list[torch.Tensor | None],
                     block_m: int) -> tuple[np.ndarray, torch.Tensor | None]:
    """Host-side tiles [num_tiles, 6] int32 for the masked sequences, and their masks
    packed into one flat int8 tensor (row-major per sequence), or (empty, None)."""
    tiles, flat, off = [], [], 0
    for i, m in enumerate(masks):
        if m is None:
            continue
        n, w = m.shape
        for m0 in range(0, n, block_m):
            tiles.append((i, query_start_loc[i], n, m0, off, w))
        flat.append(m.reshape(-1).to(torch.int8))
        off += n * w
    if not tiles:
        return np.zeros((0, TREE_TILE_FIELDS), dtype=np.int32), None
    return np.asarray(tiles, dtype=np.int32), torch.cat(flat)


def tree_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, tiles: torch.Tensor, mask: torch.Tensor, scale: float,
                   out: torch.Tensor, block_m: int = 16, block_n: int = 32, num_warps: int = 4) -> None:
    """q: [T, heads, d]; kv_cache: [2, blocks, block_size, kv_heads, d] with the tree rows'
    K/V written; block_tables: [S, max_blocks] int32; seq_lens: [S] int32; tiles / mask from
    build_tree_tiles (block_m the same). Fills the tree rows of out [T, heads, d]."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[3]
    dim_p2 = max(16, triton.next_power_of_2(d))
    _tree_kernel[(heads, tiles.shape[0])](
        q, kv_cache, block_tables, seq_lens, tiles, mask, out, scale * LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=d, DIM_P2=dim_p2,
        PAD_D=dim_p2 != d, BLOCK_M=block_m, BLOCK_N=block_n, **dot_flags(q), num_warps=num_warps)
