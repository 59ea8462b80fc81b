"""Triton MLA decode over the paged latent KV cache, flash-decoding style.

With weight absorption every query head attends to the same cache row per token (the
normalized latent c_kv, [R], followed by the rope key k_pe, [P]): one KV "head" for all
16-128 query heads, and the latent is both key and value. So a program takes a tile of
BLOCK_H heads and, per tile of BLOCK_N tokens, reads the latent once and uses it twice:

    scores [BLOCK_H, BLOCK_N] = q_nope [BLOCK_H, R] @ c^T + q_rope [BLOCK_H, P] @ pe^T
    acc    [BLOCK_H, R]      += softmax-so-far(scores) @ c

Grid: (head tile, KV split, sequence). The head tile is the fastest-varying axis, so the
programs of one (sequence, split) are scheduled together and, when the heads take several
tiles, the later tiles find the latent in L2 instead of HBM. Each split writes its partial
output and base-2 log-sum-exp; a second kernel merges them. With one split the first kernel
writes the final output itself.

Torch reference: `ember.attention.mla_ref.mla_decode_ref`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import LOG2E, dot_flags, mma

# More than triton_decode's 64: MLA has one KV head, so at batch 1 only the splits (times
# the head tiles) spread a long context over the GPU.
MAX_SPLITS = 128


@dataclass(frozen=True)
class MlaKernelConfig:
    block_h: int     # query heads per program (>= 16: the tl.dot minimum)
    block_n: int     # tokens per KV tile
    num_warps: int
    num_stages: int


def default_config(num_heads: int, on_cuda: bool, elem_bytes: int = 2) -> MlaKernelConfig:
    """Tiles for R = 512, P = 64 on a Hopper GPU. Up to 32 heads share one program, 64 from
    64 heads on (measured faster despite the larger [BLOCK_H, R] fp32 accumulator). fp32 inputs (tests, checks) take half as many tokens per tile
    to stay inside shared memory. On the CPU (the interpreter, tests) every op costs about
    the same whatever its size, so there the tiles are as large as the test shapes allow."""
    block_h = min(32, max(16, triton.next_power_of_2(num_heads)))
    if not on_cuda:
        return MlaKernelConfig(block_h, 32, 4, 1)
    if num_heads >= 64 and elem_bytes <= 2:
        # The H200 sweep (bench/mla_gpu.py --sweep) put 64-head tiles first at 128 heads,
        # 1.1x the 32-head tiles over its cases: fewer re-reads of each latent tile.
        return MlaKernelConfig(64, 32, 8, 2)
    return MlaKernelConfig(block_h, 32 if elem_bytes <= 2 else 16, 4 if block_h == 16 else 8, 2)


@triton.jit
def _mla_split_kernel(
    q_nope_ptr, q_rope_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, out_ptr,
    part_o_ptr, part_lse_ptr,
    scale_log2,
    stride_qn_b, stride_qn_h, stride_qr_b, stride_qr_h,
    stride_c_block, stride_c_slot,
    stride_bt,
    stride_o_b, stride_o_h,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    RANK: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    head_tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    # Splits are whole BLOCK_N tiles of this sequence's own length (read on the device, so
    # a graph captured with one split count serves any lengths); trailing splits may be empty.
    num_tiles = (seq_len + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    h = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < NUM_HEADS
    r = tl.arange(0, RANK)
    p = tl.arange(0, ROPE)
    q_nope = tl.load(q_nope_ptr + b * stride_qn_b + h[:, None] * stride_qn_h + r[None, :],
                     mask=h_mask[:, None], other=0.0)  # [BLOCK_H, RANK]
    q_rope = tl.load(q_rope_ptr + b * stride_qr_b + h[:, None] * stride_qr_h + p[None, :],
                     mask=h_mask[:, None], other=0.0)  # [BLOCK_H, ROPE]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RANK], tl.float32)
    zero_scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table_row = block_table_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = cache_ptr + block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot  # [BLOCK_N]
        c = tl.load(rows[:, None] + r[None, :], mask=valid[:, None], other=0.0).to(q_nope.dtype)
        pe = tl.load(rows[:, None] + RANK + p[None, :], mask=valid[:, None], other=0.0).to(q_nope.dtype)
        scores = mma(q_nope, tl.trans(c), zero_scores, PRECISION, UPCAST)
        scores = mma(q_rope, tl.trans(pe), scores, PRECISION, UPCAST) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        # The same latent tile is the value: no second read.
        acc = mma(prob.to(c.dtype), c, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    # An empty split (or a padded sequence of length 0) has no keys: it writes zeros and a
    # log-sum-exp of -inf, which the merge weighs as nothing.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_o_b + h[:, None] * stride_o_h + r[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        # part_o: [B, NUM_HEADS, NUM_SPLITS, RANK] fp32; part_lse: [B, NUM_HEADS, NUM_SPLITS].
        row = (b.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_o_ptr + row[:, None] * RANK + r[None, :], o, mask=h_mask[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=h_mask)


@triton.jit
def _mla_merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_o_b, stride_o_h,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    RANK: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    row = b.to(tl.int64) * NUM_HEADS + h
    sp = tl.arange(0, SPLITS_P2)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all (a padded sequence): zeros
    total = tl.sum(tl.exp2(lse - m), 0)
    r = tl.arange(0, RANK)
    # One split at a time: [NUM_SPLITS, RANK] at once would not fit in registers.
    acc = tl.zeros([RANK], tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(part_lse_ptr + row * NUM_SPLITS + s) - m)
        acc += w * tl.load(part_o_ptr + (row * NUM_SPLITS + s) * RANK + r)
    res = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + r, res.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, num_heads: int, max_seq_len: int, num_sms: int,
                      block_h: int | None = None, min_tokens_per_split: int = 256) -> int:
    """Enough programs (sequences x head tiles x splits) to fill the GPU a few times over,
    but no split too short to pay for itself. Host integers only, so it is fixed before a
    CUDA-graph capture.

    A split costs a [heads, R] fp32 partial, written and then read by the merge: 8 * heads * R
    bytes against the ~2.25 * R bytes of bf16 latent it reads per token. So a split gets at
    least 8 * heads tokens (its partials stay under about half of its latent), and never
    fewer than `min_tokens_per_split`."""
    if block_h is None:
        block_h = default_config(num_heads, True).block_h
    head_tiles = -(-num_heads // block_h)
    want = math.ceil(4 * num_sms / max(1, batch * head_tiles))
    most = max(1, max_seq_len // max(min_tokens_per_split, 8 * num_heads))
    return int(max(1, min(want, most, MAX_SPLITS)))


def mla_decode(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               out: torch.Tensor | None = None, num_splits: int | None = None,
               config: MlaKernelConfig | None = None) -> torch.Tensor:
    """Absorbed MLA decode, one query token per sequence (same semantics as mla_decode_ref).

    q_nope: [B, H, R] (absorbed through W_UK); q_rope: [B, H, P]; may be strided views of one
    [B, H, R + P] tensor. cache: [num_blocks, block_size, R + P]; block_tables: [B, max_blocks]
    int32; seq_lens: [B] int32 (a 0 row, e.g. CUDA-graph padding, yields zeros).
    num_splits: KV splits per sequence, a host int (None: choose_num_splits with the GPU's
    SM count and the block table's width as the longest length).
    returns out: [B, H, R] in q_nope's dtype. No host synchronization (CUDA-graph safe).
    """
    batch, heads, rank = q_nope.shape
    rope = q_rope.shape[-1]
    assert q_rope.shape[:2] == (batch, heads), "q_nope and q_rope disagree on batch or heads"
    assert cache.dim() == 3 and cache.shape[-1] == rank + rope, "cache must be [blocks, block_size, R + P]"
    # tl.arange needs powers of two, tl.dot at least 16; DeepSeek's 512 and 64 are both.
    for name, dim in (("kv_lora_rank", rank), ("qk_rope_head_dim", rope)):
        assert dim >= 16 and dim & (dim - 1) == 0, f"{name}={dim}: must be a power of two >= 16"
    assert q_nope.stride(-1) == 1 and q_rope.stride(-1) == 1 and cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(q_nope)
    assert out.shape == q_nope.shape and out.stride(-1) == 1
    if batch == 0:
        return out
    if config is None:
        config = default_config(heads, q_nope.is_cuda, q_nope.element_size())
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q_nope.device).multi_processor_count if q_nope.is_cuda else 4
        num_splits = choose_num_splits(batch, heads, block_tables.shape[1] * cache.shape[1], sms,
                                       config.block_h)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    if num_splits > 1:
        part_o = torch.empty((batch, heads, num_splits, rank), dtype=torch.float32, device=q_nope.device)
        part_lse = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q_nope.device)
    else:
        part_o = part_lse = out  # unused
    grid = (triton.cdiv(heads, config.block_h), num_splits, batch)
    _mla_split_kernel[grid](
        q_nope, q_rope, cache, block_tables, seq_lens, out, part_o, part_lse,
        scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1),
        cache.stride(0), cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=heads, NUM_SPLITS=num_splits, BLOCK_SIZE=cache.shape[1],
        RANK=rank, ROPE=rope, BLOCK_H=config.block_h, BLOCK_N=config.block_n,
        **dot_flags(q_nope),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _mla_merge_kernel[(heads, batch)](
            part_o, part_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=heads, NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
            RANK=rank, num_warps=4,
        )
    return out
