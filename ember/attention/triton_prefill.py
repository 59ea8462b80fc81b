"""Triton prefill attention, FlashAttention-2 style, over a paged KV cache.

A variable-length batch of prefill chunks. Each chunk has `q_len` new queries at positions
[ctx, ctx + q_len) of its sequence, where ctx tokens are already in the cache. A program
owns one tile of BLOCK_M queries of one chunk for one query head (grid: query head x tile;
query heads of one kv group are neighbours in launch order, so they share K/V through L2
and no kv head is ever copied). It keeps the running max, sum and fp32 accumulator of an
online softmax and streams keys in BLOCK_N tiles:

1. the cached prefix [0, ctx), read from the paged cache through the block table;
   every query sees all of it, so only the tail tile needs a bounds mask (its tile width
   is its own: wider tiles amortize the block-table lookups);
2. the chunk's own keys before the tile's first query, read from the new k/v: no mask;
3. the diagonal tiles of the chunk: causal mask.

Tiles are listed heaviest first (see `build_prefill_tiles`) so long tiles start early.

Torch reference: `ember.attention.torch_ref.paged_attention_ref` (the prefill rows of
`TorchAttentionBackend`).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ember.attention.triton_common import LOG2E, dot_flags, mma

TILE_FIELDS = 4  # seq index, first row of the chunk in q, chunk length, tile offset in chunk


@triton.jit
def _online_softmax_step(q, k, v, m_i, l_i, acc, scale_log2, mask, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr, APPLY_MASK: tl.constexpr):
    """One key tile: k, v [BLOCK_N, D] -> updated (m_i, l_i, acc)."""
    scores = mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), PRECISION,
                 UPCAST) * scale_log2  # [BLOCK_M, BLOCK_N]
    if APPLY_MASK:
        scores = tl.where(mask, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row with every key masked so far keeps m = -inf; subtract 0 instead to avoid nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, PAD_D: tl.constexpr):
    """A [rows, DIM_P2] tile; masks only where a tail or head_dim padding needs them."""
    if ROW_MASK:
        if PAD_D:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _prefix_tile(q, m_i, l_i, acc, n0, ctx, table_row, cache_base, stride_c_kv, stride_c_block,
                 stride_c_slot, d, d_mask, scale_log2, BLOCK_SIZE: tl.constexpr,
                 BLOCK_NP: tl.constexpr, TAIL: tl.constexpr, PAD_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Keys [n0, n0 + BLOCK_NP) of the cached prefix, found through the block table."""
    pos = n0 + tl.arange(0, BLOCK_NP)
    valid = pos < ctx
    if TAIL:
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0)
    else:
        block = tl.load(table_row + pos // BLOCK_SIZE)
    rows = block.to(tl.int64) * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot
    ptrs = cache_base + rows[:, None] + d[None, :]
    k = _load_rows(ptrs, valid, d_mask, TAIL, PAD_D).to(q.dtype)
    v = _load_rows(ptrs + stride_c_kv, valid, d_mask, TAIL, PAD_D).to(q.dtype)
    return _online_softmax_step(q, k, v, m_i, l_i, acc, scale_log2, valid[None, :],
                                PRECISION, UPCAST, TAIL)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, tiles_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = h // GROUP
    seq = tl.load(tiles_ptr + tile * 4)
    q_begin = tl.load(tiles_ptr + tile * 4 + 1)
    q_len = tl.load(tiles_ptr + tile * 4 + 2)
    m0 = tl.load(tiles_ptr + tile * 4 + 3)
    ctx = tl.load(seq_lens_ptr + seq) - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, DIM_P2)
    d_mask = d < HEAD_DIM
    m_mask = offs_m < q_len
    rows_q = (q_begin + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows_q[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, DIM_P2]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)

    # 1. Cached prefix, through the block table, in tiles of BLOCK_NP: whole tiles without
    # masks, then the tail.
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    cache_base = cache_ptr + kvh * stride_c_head
    ctx_whole = ctx - ctx % BLOCK_NP
    for n0 in range(0, ctx_whole, BLOCK_NP):
        m_i, l_i, acc = _prefix_tile(q, m_i, l_i, acc, n0, ctx, table_row, cache_base, stride_c_kv,
                                     stride_c_block, stride_c_slot, d, d_mask, scale_log2,
                                     BLOCK_SIZE, BLOCK_NP, False, PAD_D, PRECISION, UPCAST)
    for n0 in range(ctx_whole, ctx, BLOCK_NP):  # at most once
        m_i, l_i, acc = _prefix_tile(q, m_i, l_i, acc, n0, ctx, table_row, cache_base, stride_c_kv,
                                     stride_c_block, stride_c_slot, d, d_mask, scale_log2,
                                     BLOCK_SIZE, BLOCK_NP, True, PAD_D, PRECISION, UPCAST)

    # 2. The chunk's keys wholly before this tile's first query: visible to every query.
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    for n0 in range(0, m0, BLOCK_N):
        rows_k = (q_begin + n0 + offs_n).to(tl.int64)
        k = _load_rows(k_base + rows_k[:, None] * stride_kt + d[None, :], offs_n, d_mask, False, PAD_D)
        v = _load_rows(v_base + rows_k[:, None] * stride_vt + d[None, :], offs_n, d_mask, False, PAD_D)
        m_i, l_i, acc = _online_softmax_step(q, k.to(q.dtype), v.to(q.dtype), m_i, l_i, acc,
                                             scale_log2, offs_n[None, :], PRECISION, UPCAST, False)

    # 3. The diagonal: causal mask.
    diag_end = tl.minimum(m0 + BLOCK_M, q_len)
    for n0 in range(m0, diag_end, BLOCK_N):
        j = n0 + offs_n
        valid = j < q_len
        rows_k = (q_begin + j).to(tl.int64)
        k = _load_rows(k_base + rows_k[:, None] * stride_kt + d[None, :], valid, d_mask, True, PAD_D)
        v = _load_rows(v_base + rows_k[:, None] * stride_vt + d[None, :], valid, d_mask, True, PAD_D)
        k, v = k.to(q.dtype), v.to(q.dtype)
        causal = (j[None, :] <= offs_m[:, None]) & valid[None, :]
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, scale_log2, causal,
                                             PRECISION, UPCAST, True)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows_q[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def build_prefill_tiles(query_start_loc: list[int], first_seq: int, seq_lens: list[int],
                        block_m: int) -> np.ndarray:
    """Host-side tile list for sequences [first_seq, S): int32 [num_tiles, 4] rows of
    (seq, chunk's first row in q, chunk length, tile offset), heaviest tile first."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    seqs = np.arange(first_seq, len(qsl) - 1)
    if len(seqs) == 0:
        return np.zeros((0, TILE_FIELDS), dtype=np.int32)
    q_len = qsl[seqs + 1] - qsl[seqs]
    n_tiles = -(-q_len // block_m)
    seq_of_tile = np.repeat(seqs, n_tiles)
    first_tile = np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
    offset = (np.arange(n_tiles.sum()) - first_tile) * block_m
    chunk_len = np.repeat(q_len, n_tiles)
    ctx = np.asarray(seq_lens, dtype=np.int64)[seq_of_tile] - chunk_len
    # Work of a tile ~ keys it visits: ctx + offset + its own diagonal.
    order = np.argsort(-(ctx + offset), kind="stable")
    tiles = np.stack([seq_of_tile, qsl[seq_of_tile], chunk_len, offset], axis=1)[order]
    return tiles.astype(np.int32)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, tiles: torch.Tensor,
                      scale: float, out: torch.Tensor, block_m: int, block_n: int,
                      num_warps: int = 4, num_stages: int = 2,
                      block_n_prefix: int | None = None) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] (the new tokens, rows matching q);
    kv_cache: [2, blocks, block_size, kv_heads, d] holding each sequence's cached prefix;
    block_tables: [S, max_blocks] int32; seq_lens: [S] int32 (KV length after this step);
    tiles: [num_tiles, 4] int32 from `build_prefill_tiles` with the same block_m.
    Fills the chunk rows of out [T, heads, d]. Keys come in tiles of block_n from the chunk
    and of block_n_prefix (default block_n) from the cached prefix."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[3]
    group = heads // kv_heads
    assert heads == group * kv_heads and block_m % block_n == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    num_tiles = tiles.shape[0]
    if num_tiles == 0:
        return out
    _prefill_kernel[(heads, num_tiles)](
        q, k, v, kv_cache, block_tables, seq_lens, tiles, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_SIZE=kv_cache.shape[2],
        HEAD_DIM=d, DIM_P2=max(16, triton.next_power_of_2(d)),
        PAD_D=d != max(16, triton.next_power_of_2(d)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_NP=block_n_prefix or block_n,
        **dot_flags(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
