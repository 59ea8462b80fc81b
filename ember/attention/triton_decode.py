"""Triton paged decode attention, flash-decoding style.

One query token per sequence. The KV length of each sequence is split across programs
(grid: sequence x kv head x split); each program handles every query head of its kv head
group, so each K/V tile is read from HBM once for the whole group. Each program writes a
partial output and its log-sum-exp; a second kernel merges the splits. With one split the
first kernel writes the final output itself.

Torch reference: `ember.attention.torch_ref.paged_attention_ref` (the decode rows of
`TorchAttentionBackend`).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import LOG2E, dot_flags, mma
from ember.layers.pdl import pdl_launch

MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    stride_bt,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:   # launched early (ember.layers.pdl): wait for the kernel before, let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + s)
    # Splits are whole BLOCK_N tiles of this sequence's own length; trailing splits may be empty.
    # (Plain integer arithmetic, not tl.cdiv: the CPU interpreter can only run library jit
    # functions when triton was imported with TRITON_INTERPRET set.)
    num_tiles = (seq_len + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, DIM_P2)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + s * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [GROUP_P2, DIM_P2]

    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, DIM_P2], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    zero_scores = tl.zeros([GROUP_P2, BLOCK_N], tl.float32)
    table_row = block_table_ptr + s.to(tl.int64) * stride_bt
    kv_base = cache_ptr + kvh * stride_c_head
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot  # [BLOCK_N]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(kv_base + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        scores = mma(q, tl.trans(k.to(q.dtype)), zero_scores, PRECISION, UPCAST) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))  # [GROUP_P2, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_base + stride_c_kv + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = mma(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + s * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_o: [S, heads, NUM_SPLITS, DIM_P2]; part_lse: [S, heads, NUM_SPLITS] (base 2).
        row = (s * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split  # [GROUP_P2]
        tl.store(part_o_ptr + row[:, None] * DIM_P2 + d[None, :], o, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:   # launched early (ember.layers.pdl): wait for the kernel before, let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.program_id(0)
    h = tl.program_id(1)
    row = s * tl.num_programs(1) + h
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, DIM_P2)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all (a padded sequence): output zeros
    w = tl.exp2(lse - m)  # [SPLITS_P2]
    o = tl.load(part_o_ptr + (row * NUM_SPLITS + sp[:, None]) * DIM_P2 + d[None, :],
                mask=(sp[:, None] < NUM_SPLITS) & (d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + s * stride_ot + h * stride_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


# The shortest split worth its fixed cost. CUDA graphs fix the split count for
# max_model_len, so at batch 1 a short context uses only its first splits: shorter splits
# then mean more programs sharing it. EMBER_DECODE_SPLIT_TOKENS overrides it (A/B runs).
MIN_TOKENS_PER_SPLIT = int(os.environ.get("EMBER_DECODE_SPLIT_TOKENS", "256"))


def choose_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int, num_sms: int,
                      min_tokens_per_split: int | None = None) -> int:
    """Enough programs to fill the GPU a few times over, but no split shorter than
    `min_tokens_per_split` (its fixed cost would dominate). Host integers only."""
    min_tokens_per_split = min_tokens_per_split or MIN_TOKENS_PER_SPLIT
    want = math.ceil(4 * num_sms / max(1, num_seqs * kv_heads))
    most = max(1, max_seq_len // min_tokens_per_split)
    return int(max(1, min(want, most, MAX_SPLITS)))


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int,
                     out: torch.Tensor | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q: [S, heads, d] (one query per sequence, at position seq_len - 1);
    kv_cache: [2, blocks, block_size, kv_heads, d]; block_tables: [S, max_blocks] int32;
    seq_lens: [S] int32 -> out [S, heads, d]. No host synchronization (CUDA-graph safe)."""
    s, heads, d = q.shape
    kv_heads = kv_cache.shape[3]
    block_size = kv_cache.shape[2]
    group = heads // kv_heads
    assert heads == group * kv_heads and q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q)
    if s == 0:
        return out
    dim_p2 = max(16, triton.next_power_of_2(d))
    if block_n is None:
        block_n = 64 if q.is_cuda else 16
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    if num_splits > 1:
        part_o = torch.empty((s, heads, num_splits, dim_p2), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((s, heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    _decode_split_kernel[(s, kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, BLOCK_SIZE=block_size,
        GROUP=group, GROUP_P2=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, DIM_P2=dim_p2, BLOCK_N=block_n,
        **dot_flags(q), **pdl_launch(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(s, heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
            HEAD_DIM=d, DIM_P2=dim_p2, num_warps=4 if dim_p2 >= 128 else 1, **pdl_launch(q),
        )
    return out
