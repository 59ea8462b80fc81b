"""Triton FP8 weight-only GEMV for decode rows: y = x @ (W_fp8 * scale)^T, with x kept in
the run dtype (W8A16). Torch reference: `fp8_linear_ref` in kernels/__init__.py.

At a few rows a linear layer is bound by reading its weights, so 1-byte weights halve the
time of bf16 ones; quantizing the activations first (W8A8) would only add launches there,
and leaving them unquantized is the more exact of the two. Larger batches use W8A8
through torch._scaled_mm (ember/quant/fp8.py).

Grid (N tiles, K splits, rows). Weights are read as int32 words of four E4M3 bytes and
decoded by moving bits (kernels/decode.py); decoding with Triton's fp8 casts held this
kernel to ~65% of the H200's bandwidth (conversions run at a fraction of the FMA rate).
Two inner loops: fp32 FMAs per weight, or (PACKED tiles, bf16 x) pairs of words in packed
bf16 math with one widening to fp32 per pair (decode.fp8_word_dot2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.layers.pdl import pdl_launch
from ember.quant.kernels.decode import (E4M3_FACTOR_HALF, e4m3_parts, fp8_word_dot2, fp8_x_operand,
                                        fp8_x_quad, native_decode, x_operand, x_pair)
from ember.quant.kernels.prefetch import prefetch_tile_l2
from ember.quant.kernels.splitk import (choose_config, finish_splits, k_range, rows_and_output,
                                        split_buffers, store_split)

GEMV_MAX_ROWS = 8
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps[, PACKED[, AHEAD]]). Long K wants few rows per
# program with long tiles and splits (the down projection: K = 14336, N = 4096); wide N
# wants many programs. PACKED tiles (bf16 x only) multiply in packed bf16 math
# (_fp8_packed_tile): a quarter fewer instructions per weight, which won qkv (9.7 -> 8.4
# us), gate_up (33.0 -> 32.3) and down (18.0 -> 17.8) at one row of the Llama-8B shape on
# the H200, not o (6.6 -> 7.2); the kept ones were a shape's best or within 3% of it
# (bench/results/h200_2026-11-30m_fp8_packed_configs.txt). AHEAD tiles prefetch into L2
# (kernels/prefetch.py): the two kept won qkv (8.4 -> 7.9 us), o (6.7 -> 6.3) and down
# (18.0 -> 17.8) in bench/results/h200_2026-11-30n_ahead_configs.txt. Longer packed tiles
# with 4-8 warps stream gate_up faster (16 x 2048, 8 warps: 30.6 against 32.0 us, where a
# read of the same tiling with no decode takes 28.2;
# bench/results/h200_2026-11-30n_stream_probe.txt); 16 x 2048 also won o and down (6.2,
# 15.9 us; ..._final_configs.txt). Five more (16 x 4096, 32 x 2048, 8 x 2048, 16 warps)
# won no shape (..._more_tiles.txt).
CONFIGS = ((32, 256, 2, 4), (16, 256, 4, 4), (32, 128, 4, 4), (16, 512, 2, 4), (8, 1024, 1, 2),
           (16, 512, 4, 4), (8, 512, 4, 2), (4, 1024, 4, 2), (32, 256, 1, 4), (16, 512, 1, 4),
           (64, 256, 4, 4), (32, 512, 4, 4), (64, 128, 8, 4), (32, 256, 8, 4), (64, 256, 4, 8),
           (8, 1024, 1, 2, 1), (64, 256, 4, 4, 1), (64, 256, 4, 8, 1), (32, 512, 4, 4, 1),
           (16, 512, 4, 4, 1), (32, 256, 8, 4, 1), (8, 1024, 1, 2, 1, 1), (8, 1024, 1, 2, 0, 1),
           (16, 2048, 1, 8, 1), (32, 1024, 1, 8, 1), (16, 1024, 1, 4, 1), (16, 2048, 1, 8, 1, 1))


@triton.jit
def _fp8_tile(acc2, q, x_row, col, live, NATIVE: tl.constexpr, X_PAIRS: tl.constexpr):
    """acc2 [BN, WORDS] += each word's 4 weights (q [BN, WORDS]) times x at columns
    col + j (col [WORDS] = first column of each word). X_PAIRS: x_row points at x's bf16
    pairs as int32 (decode_x_pairs)."""
    p = e4m3_parts(q, NATIVE, tl.float32)
    if X_PAIRS:
        x0, x1 = x_pair(x_row + col // 2, live)
        x2, x3 = x_pair(x_row + col // 2 + 1, live)
    else:
        x0 = tl.load(x_row + col, mask=live, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + col + 1, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + col + 2, mask=live, other=0.0).to(tl.float32)
        x3 = tl.load(x_row + col + 3, mask=live, other=0.0).to(tl.float32)
    acc2 += p[0] * x0[None, :] + p[1] * x1[None, :]
    acc2 += p[2] * x2[None, :] + p[3] * x3[None, :]
    return acc2


@triton.jit
def _fp8_tile_load(w_ptr, n_safe, wi, k0, live, stride_wn):
    """The words [BN, WORDS] of the tile at column k0 (zeros when not live); evict-first,
    as the weights are read once a step."""
    return tl.load(w_ptr + n_safe[:, None] * stride_wn + (k0 // 4 + wi)[None, :], mask=live, other=0,
                   eviction_policy="evict_first")


@triton.jit
def _fp8_packed_tile(acc2, qa, qb, x_row, col, half: tl.constexpr, live, NATIVE: tl.constexpr):
    """acc2 [BN, HALF] += the dot of each word pair (qa at columns col, qb at col + half:
    the two halves of a tile) with x, times 2^-60 (decode.fp8_word_dot2); x_row points at
    x's bf16 quads as int64 (decode.fp8_x_operand)."""
    xa02, xa13 = fp8_x_quad(x_row + col // 4, live, NATIVE)
    xb02, xb13 = fp8_x_quad(x_row + (col + half) // 4, live, NATIVE)
    return acc2 + fp8_word_dot2(qa, qb, xa02[None, :], xa13[None, :], xb02[None, :], xb13[None, :], NATIVE)


@triton.jit
def _fp8_gemv_kernel(x_ptr, y_ptr, part_ptr, cnt_ptr, w_ptr, s_ptr, M, N, K, stride_xm, stride_wn,
                     NATIVE: tl.constexpr, X_PAIRS: tl.constexpr, PACKED: tl.constexpr,
                     SPLIT_K: tl.constexpr, FIXUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr):
    """Grid (N tiles, SPLIT_K, M). w: [N, K / 4] int32 words of 4 E4M3 bytes; y [M, N],
    split partials and counters as splitk.store_split. PACKED (bf16 x read as quads): each
    tile is two halves of BLOCK_K / 2 columns whose words pair up in packed bf16 math;
    else fp32 FMAs per weight. AHEAD > 0: tile i + 1 + AHEAD is prefetched into L2 while
    tile i is decoded (kernels/prefetch.py), tiles 1..AHEAD before PDL's wait."""
    WORDS: tl.constexpr = BLOCK_K // 4 // (2 if PACKED else 1)
    m = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    start, end = k_range(K, SPLIT_K, BLOCK_K)
    # Rows past N re-read the last row; their results are never stored.
    n_safe = tl.minimum(n, N - 1)
    wi = tl.arange(0, WORDS)
    x_row = x_ptr + m * stride_xm
    acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    # The first weight tile is requested before waiting for the kernel that writes x
    # (launched early under PDL, ember.layers.pdl); an empty split adds nothing.
    q = _fp8_tile_load(w_ptr, n_safe, wi, start, start < end, stride_wn)
    if PACKED:
        qb = _fp8_tile_load(w_ptr, n_safe, wi, start + BLOCK_K // 2, start < end, stride_wn)
    for j in tl.static_range(1, AHEAD + 1):
        prefetch_tile_l2(w_ptr, n_safe, stride_wn, start + j * BLOCK_K, end, BLOCK_K, NATIVE)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # Registers double-buffer the weight stream: the next tile's loads are in flight while
    # this one is decoded (65.8 against 74.0 us per Llama-8B layer on the H200,
    # bench/results/h200_2026-11-29f_skinny_ab.txt).
    for k0 in range(start, end, BLOCK_K):
        nxt = k0 + BLOCK_K < end
        if AHEAD > 0:
            prefetch_tile_l2(w_ptr, n_safe, stride_wn, k0 + (AHEAD + 1) * BLOCK_K, end, BLOCK_K, NATIVE)
        nq = _fp8_tile_load(w_ptr, n_safe, wi, k0 + BLOCK_K, nxt, stride_wn)
        if PACKED:
            nqb = _fp8_tile_load(w_ptr, n_safe, wi, k0 + BLOCK_K + BLOCK_K // 2, nxt, stride_wn)
            acc2 = _fp8_packed_tile(acc2, q, qb, x_row, k0 + 4 * wi, BLOCK_K // 2, wi < WORDS, NATIVE)
            qb = nqb
        else:
            acc2 = _fp8_tile(acc2, q, x_row, k0 + 4 * wi, wi < WORDS, NATIVE, X_PAIRS)
        q = nq
    scale = tl.load(s_ptr + n_safe) * E4M3_FACTOR_HALF
    if PACKED:
        acc = tl.sum(acc2, axis=1) * scale              # products carry 2^-60
    else:
        acc = tl.sum(acc2, axis=1) * scale * E4M3_FACTOR_HALF
    store_split(acc, y_ptr, part_ptr, cnt_ptr, m * N + n, n_mask, M * N,
                tl.program_id(0) + tl.num_programs(0) * m, SPLIT_K, FIXUP)


def fp8_gemv_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    config: tuple | None = None) -> torch.Tensor:
    """x: [..., K] (at most GEMV_MAX_ROWS rows); weight: [N, K] float8_e4m3fn;
    scale: [N] fp32 dequant multipliers -> [..., N] in x's dtype."""
    n_out, k_in = weight.shape
    x2, y = rows_and_output(x, k_in, n_out, GEMV_MAX_ROWS)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    if k_in % 4:
        raise ValueError(f"fp8_gemv_triton needs K % 4 == 0 (4-byte words), got {k_in}")
    w = weight.view(torch.uint8).view(torch.int32)   # [N, K // 4], little-endian bytes
    kmax = k_in & -k_in   # BLOCK_K must divide K (masks cover N only)

    # bf16 x: PACKED tiles read it four at a time (tiles of two halves of >= 2 words)
    quads = fp8_x_operand(x2) if kmax >= 16 else None
    xp, pairs = x_operand(x2)

    def run(c: tuple) -> None:
        bn, bk, split, warps = c[:4]
        packed = len(c) > 4 and bool(c[4]) and quads is not None
        ahead = c[5] if len(c) > 5 else 0
        bk = min(bk, kmax)
        xk = quads if packed else xp
        part, cnt, fixup = split_buffers(y, split, triton.cdiv(n_out, bn) * m, True)
        _fp8_gemv_kernel[(triton.cdiv(n_out, bn), split, m)](
            xk, y, part, cnt, w, scale, m, n_out, k_in, xk.stride(0), w.stride(0),
            NATIVE=native_decode(), X_PAIRS=pairs, PACKED=packed, SPLIT_K=split, FIXUP=fixup,
            BLOCK_N=bn, BLOCK_K=bk, AHEAD=ahead, num_warps=warps, **pdl_launch(x2))
        finish_splits(part, y, fixup)

    cands = [c for c in CONFIGS if quads is not None or len(c) == 4 or not c[4]]
    run(config or choose_config(("fp8_gemv", m, n_out, k_in), cands, run, x))
    return y.reshape(*x.shape[:-1], n_out)
