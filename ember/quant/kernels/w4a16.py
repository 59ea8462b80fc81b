"""Triton W4A16 kernels: y = x @ dequant(W)^T with the dequantization fused into the GEMV /
GEMM, for ember's INT4 (AWQ/RTN) and NVFP4 layouts, and the INT4 dequantization that
serves large batches. Torch references: `int4_linear_ref`, `nvfp4_linear_ref` in
kernels/__init__.py.

Both formats are read as int32 words of eight 4-bit codes (NVFP4's byte pairs, viewed as
little-endian int32, put column 8w + j in nibble j exactly as INT4 packs them).

- Decoder GEMV (M <= GEMV_MAX_ROWS, decode): tiles of [BLOCK_N, GROUPS, GW] words, GW
  words of each of GROUPS quantization groups (whole groups, or one run inside a group);
  one scale (and zero) per row per group. With bf16 x each word's dot runs in packed bf16
  math (decode.int4_word_dot: sum_j (c_j - z) x_j; decode.nvfp4_word_dot: the E2M1 values
  looked up by prmt), times the scale in fp32; otherwise fp32 parts. NVFP4's E4M3 block
  scales are decoded per 16 columns, its per-row global scale applied at the end.
- Word-form GEMV (NVFP4 widths no decoder tile fits): products accumulate in a
  [BLOCK_N, BLOCK_K / 8, 8] register tile reduced once at the end.
- GEMM (batched): the tile unpacked to [BLOCK_N, BLOCK_K] for one tl.dot.
- INT4 dequantization to [N, K] (AWQ above 64 rows, then the dense GEMM): the register
  decoder in 256-column rows.
- Split-K (kernels/splitk.py): more programs than output tiles alone give.

Launchers allocate only their outputs, so they are CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.layers.pdl import pdl_launch
from ember.quant.kernels.decode import (INT4_OFFSET, E2M1_UNSCALE, e2m1_scaled, e4m3_from_bits,
                                        int4_columns, int4_parts, int4_word_dot, int4_zero_pair, native_decode,
                                        nvfp4_columns, nvfp4_word_dot, x_operand)
from ember.quant.kernels.int4_mma import INT4_MMA_CONFIGS, int4_mma_gemv, mma_applies
from ember.quant.kernels.splitk import (choose_config, finish_splits, k_range,
                                        rows_and_output, split_buffers, split_output, store_split,
                                        sum_splits)

GEMV_MAX_ROWS = 8


# ---- dequantization (inlined into the kernels) ------------------------------------------------
@triton.jit
def _scales(s_ptr, z_ptr, n, n_mask, k0, word, w_mask, stride_sn, G: tl.constexpr,
            NVFP4: tl.constexpr, ONE_GROUP: tl.constexpr):
    """The multiplier and offset that dequantize each nibble: w = code * sc + off.
    ONE_GROUP (INT4, tile inside one group): [BLOCK_N, 1]; else per word [BLOCK_N, WORDS]
    (a word never straddles a group or a 16-block: G is a multiple of 8)."""
    if ONE_GROUP:
        g = k0 // G
        sc = tl.load(s_ptr + n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        zp = tl.load(z_ptr + n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)[:, None]
    else:
        off = n[:, None] * stride_sn + (word[None, :] * 8) // G
        mask = n_mask[:, None] & w_mask[None, :]
        if NVFP4:
            sb = tl.load(s_ptr + off, mask=mask, other=0).to(tl.int32)
            sc = e4m3_from_bits(sb) * E2M1_UNSCALE   # see decode.e2m1_scaled
            zp = tl.zeros_like(sc)
        else:
            sc = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
            zp = tl.load(z_ptr + off, mask=mask, other=0).to(tl.float32)
    return sc, -zp * sc


@triton.jit
def _word_tile(w_ptr, s_ptr, z_ptr, n, n_mask, k0, K, stride_wn, stride_sn, G: tl.constexpr,
               NVFP4: tl.constexpr, ONE_GROUP: tl.constexpr, WORDS: tl.constexpr):
    """The K tile at k0 in word form: word indices and mask [WORDS], the words [BN, WORDS]
    and their dequantization multiplier and offset (see _scales)."""
    word = k0 // 8 + tl.arange(0, WORDS)
    w_mask = word < K // 8
    q = tl.load(w_ptr + n[:, None] * stride_wn + word[None, :],
                mask=n_mask[:, None] & w_mask[None, :], other=0)
    sc, off = _scales(s_ptr, z_ptr, n, n_mask, k0, word, w_mask, stride_sn, G, NVFP4, ONE_GROUP)
    return word, w_mask, q, sc, off


# ---- kernels ----------------------------------------------------------------------------------
# Tiles stay in word form: a [BLOCK_N, WORDS] load of int32 words, nibble j of every word
# taken by one shift (no reshape of [N, K/8, 8] into [N, K], which costs a layout shuffle
# through shared memory), x read at the matching columns 8w + j.
@triton.jit
def _w4_gemv_kernel(x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K, stride_xm,
                    stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                    ONE_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Grid (N tiles, SPLIT_K, M). out: y [M, N] when SPLIT_K == 1, else fp32 partials
    [SPLIT_K, M, N]."""
    WORDS: tl.constexpr = BLOCK_K // 8
    m = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    start, end = k_range(K, SPLIT_K, BLOCK_K)
    j8 = tl.arange(0, 8)
    acc3 = tl.zeros((BLOCK_N, WORDS, 8), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        word, w_mask, q, sc, off = _word_tile(w_ptr, s_ptr, z_ptr, n, n_mask, k0, K, stride_wn,
                                              stride_sn, G, NVFP4, ONE_GROUP, WORDS)
        x = tl.load(x_ptr + m * stride_xm + word[:, None] * 8 + j8[None, :],
                    mask=w_mask[:, None], other=0.0).to(tl.float32)      # [WORDS, 8]
        c = (q[:, :, None] >> (4 * j8)[None, None, :]) & 0xF              # [BN, WORDS, 8]
        if NVFP4:
            v = e2m1_scaled(c) * sc[:, :, None]
        else:
            v = c.to(tl.float32) * sc[:, :, None] + off[:, :, None]
        acc3 += v * x[None, :, :]
    acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
    if NVFP4:
        acc *= tl.load(gs_ptr + n, mask=n_mask, other=0.0)
    dst = out_ptr + (tl.program_id(1) * M + m) * N + n
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _nvfp4_tile(acc3, q, sc, x_row, col, NATIVE: tl.constexpr, X_PAIRS: tl.constexpr):
    """acc3 [BN, GROUPS, 2] += sc * sum_j value(c_j) x_j for the tile's words q [BN, GROUPS,
    2] (the two words of each 16-column block: sc [BN, GROUPS], the block scales), x at
    columns col + j (col [GROUPS, 2]). X_PAIRS: packed bf16 math (decode.nvfp4_word_dot);
    otherwise fp32."""
    if X_PAIRS:
        x01, x23, x45, x67 = _x_word_pairs(x_row, col)
        return acc3 + sc[:, :, None] * nvfp4_word_dot(q, x01[None], x23[None], x45[None], x67[None], NATIVE)
    t = e2m1_scaled(q & 0xF) * tl.load(x_row + col).to(tl.float32)[None]
    for j in tl.static_range(1, 8):
        t += e2m1_scaled((q >> (4 * j)) & 0xF) * tl.load(x_row + col + j).to(tl.float32)[None]
    return acc3 + sc[:, :, None] * (t * E2M1_UNSCALE)


@triton.jit
def _x_word_pairs(x_row, col):
    """x's bf16 pairs (int32) at each word's columns col + 0/1, 2/3, 4/5, 6/7 (col [GROUPS,
    GW]; x_row points at x as int32 pairs) -> four [GROUPS, GW] tensors."""
    xw = tl.load(x_row + col[:, :, None] // 2 + tl.arange(0, 4)[None, None, :])  # [GROUPS, GW, 4]
    x02, x13 = tl.split(tl.reshape(xw, (xw.shape[0], xw.shape[1], 2, 2)))
    x01, x45 = tl.split(x02)
    x23, x67 = tl.split(x13)
    return x01, x23, x45, x67


@triton.jit
def _int4_tile(acc3, q, sc, z, x_row, col, NATIVE: tl.constexpr, X_PAIRS: tl.constexpr):
    """acc3 [BN, GROUPS, GW] += sc * sum_j (c_j - z) x_j for the tile's words q [BN, GROUPS,
    GW] (GW words of each of GROUPS groups: sc, z [BN, GROUPS]), x at columns col + j (col
    [GROUPS, GW]: each word's first column). X_PAIRS (bf16 x read as int32 pairs,
    decode.x_operand): packed bf16 math (decode.int4_word_dot); otherwise fp32 parts, as
    sc * (sum_j x_j (c_j + 128) - (z + 128) sum_j x_j)."""
    if X_PAIRS:
        x01, x23, x45, x67 = _x_word_pairs(x_row, col)
        d = int4_word_dot(q, int4_zero_pair(z)[:, :, None], x01[None], x23[None], x45[None],
                          x67[None], NATIVE)
        return acc3 + sc[:, :, None] * d
    p = int4_parts(q, NATIVE, tl.float32)
    x0 = tl.load(x_row + col).to(tl.float32)
    x1 = tl.load(x_row + col + 1).to(tl.float32)
    x2 = tl.load(x_row + col + 2).to(tl.float32)
    x3 = tl.load(x_row + col + 3).to(tl.float32)
    x4 = tl.load(x_row + col + 4).to(tl.float32)
    x5 = tl.load(x_row + col + 5).to(tl.float32)
    x6 = tl.load(x_row + col + 6).to(tl.float32)
    x7 = tl.load(x_row + col + 7).to(tl.float32)
    t = p[0] * x0[None] + p[1] * x1[None] + p[2] * x2[None] + p[3] * x3[None]
    t += p[4] * x4[None] + p[5] * x5[None] + p[6] * x6[None] + p[7] * x7[None]
    xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    return acc3 + sc[:, :, None] * (t - (z.to(tl.float32) + INT4_OFFSET)[:, :, None] * xs[None])


@triton.jit
def _decoder_gemv_kernel(x_ptr, y_ptr, part_ptr, cnt_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K,
                         stride_xm, stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                         NATIVE: tl.constexpr, X_PAIRS: tl.constexpr, SPLIT_K: tl.constexpr,
                         FIXUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GW: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """INT4 or NVFP4 GEMV with the register decoders (kernels/decode.py). NVFP4: G = 16,
    the E4M3 block scales in s, the per-row global scale in gs; INT4: s and z per group.
    A tile holds GW words of each of BLOCK_K / (8 GW) groups: GW = BLOCK_K / 8 inside one
    group (BLOCK_K divides G), GW = G / 8 for tiles of whole groups (G divides BLOCK_K),
    which read each weight row in longer runs (a 128-wide tile is 64 bytes of a row).
    Scale and zero apply once per group of words. PREFETCH: registers double-buffer the
    weight words, the first tile requested before PDL's wait (the weights do not depend on
    the kernel before).
    Grid (N tiles, SPLIT_K, M); y [M, N], split partials and counters as
    splitk.store_split."""
    GROUPS: tl.constexpr = BLOCK_K // (8 * GW)
    m = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n_safe = tl.minimum(n, N - 1)     # rows past N re-read the last row; never stored
    start, end = k_range(K, SPLIT_K, BLOCK_K)
    gi = tl.arange(0, GROUPS)
    words = gi[:, None] * GW + tl.arange(0, GW)[None, :]                 # [GROUPS, GW]
    w_rows = w_ptr + n_safe[:, None, None] * stride_wn + words[None, :, :]
    s_rows = n_safe[:, None] * stride_sn + gi[None, :]                   # [BN, GROUPS]
    x_row = x_ptr + m * stride_xm
    acc3 = tl.zeros((BLOCK_N, GROUPS, GW), dtype=tl.float32)
    if PREFETCH:
        q_next = tl.load(w_rows + start // 8, mask=start < end, other=0)
    else:
        q_next = tl.zeros((BLOCK_N, GROUPS, GW), dtype=tl.int32)
    if PDL:
        tl.extra.cuda.gdc_wait()      # x is written by the kernel before
        tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(start, end, BLOCK_K):
        if PREFETCH:
            q = q_next
            q_next = tl.load(w_rows + (k0 + BLOCK_K) // 8, mask=k0 + BLOCK_K < end, other=0)
        else:
            q = tl.load(w_rows + k0 // 8)
        g = k0 // G
        if NVFP4:
            sc = e4m3_from_bits(tl.load(s_ptr + s_rows + g).to(tl.int32))
            acc3 = _nvfp4_tile(acc3, q, sc, x_row, k0 + 8 * words, NATIVE, X_PAIRS)
        else:
            sc = tl.load(s_ptr + s_rows + g).to(tl.float32)
            z = tl.load(z_ptr + s_rows + g)
            acc3 = _int4_tile(acc3, q, sc, z, x_row, k0 + 8 * words, NATIVE, X_PAIRS)
    acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
    if NVFP4:
        acc *= tl.load(gs_ptr + n_safe)
    store_split(acc, y_ptr, part_ptr, cnt_ptr, m * N + n, n_mask, M * N,
                tl.program_id(0) + tl.num_programs(0) * m, SPLIT_K, FIXUP)


@triton.jit
def _expand(v, BLOCK_N: tl.constexpr, PER: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // PER] -> [BLOCK_N, BLOCK_K]: each value repeated over PER columns."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, BLOCK_K // PER, PER)), (BLOCK_N, BLOCK_K))


@triton.jit
def _w4_gemm_kernel(x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K, stride_xm,
                    stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                    ONE_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (M tiles x N tiles, SPLIT_K). out as in the GEMV. The tile is unpacked to
    [BLOCK_N, BLOCK_K] for one tl.dot: here the reshape's shuffle is amortised over
    BLOCK_M rows (eight narrower dots, one per nibble position, measured 3x slower)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    start, end = k_range(K, SPLIT_K, BLOCK_K)
    j8 = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        word, w_mask, q, sc, off = _word_tile(w_ptr, s_ptr, z_ptr, n, n_mask, k0, K, stride_wn,
                                              stride_sn, G, NVFP4, ONE_GROUP, WORDS)
        c = tl.reshape((q[:, :, None] >> (4 * j8)[None, None, :]) & 0xF, (BLOCK_N, BLOCK_K))
        if not ONE_GROUP:
            sc = _expand(sc, BLOCK_N, 8, BLOCK_K)
            off = _expand(off, BLOCK_N, 8, BLOCK_K)
        if NVFP4:
            v = e2m1_scaled(c) * sc
        else:
            v = c.to(tl.float32) * sc + off
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(v.to(x.dtype)))
    if NVFP4:
        acc *= tl.load(gs_ptr + n, mask=n_mask, other=0.0)[None, :]
    dst = out_ptr + (tl.program_id(1) * M + rm[:, None]) * N + n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & n_mask[None, :])


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, gs_ptr, out_ptr, N, K, stride_wn, stride_sn,
                         G: tl.constexpr, NVFP4: tl.constexpr, NATIVE: tl.constexpr, DT: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GW: tl.constexpr):
    """Grid (N tiles, K / (8 GROUPS GW) tiles): out [N, K] = (code - zero) * scale. Each
    program reads [BLOCK_N, GROUPS, GW] words (GW words of each of GROUPS groups, or
    GROUPS = 1 inside one group), decodes them by register moves (decode.int4_parts),
    subtracts z + 128 exactly and multiplies by the scale in DT (one rounding: the
    product of a small integer and a DT scale is exact before it) and writes rows of
    8 GROUPS GW contiguous columns. NVFP4 (G = 16, GW = 2): E2M1 values (decode.nvfp4_parts)
    times the E4M3 block scale in DT (exact), times the row's global scale (gs) in fp32,
    one rounding."""
    BK: tl.constexpr = 8 * GROUPS * GW
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    n_safe = tl.minimum(n, N - 1)       # rows past N re-read the last row; never stored
    gi = tl.arange(0, GROUPS)
    words = tl.program_id(1) * (BK // 8) + gi[:, None] * GW + tl.arange(0, GW)[None, :]
    q = tl.load(w_ptr + n_safe[:, None, None] * stride_wn + words[None, :, :])
    g = (tl.program_id(1) * BK) // G + gi
    sz = n_safe[:, None] * stride_sn + g[None, :]                       # [BN, GROUPS]
    if NVFP4:
        w = nvfp4_columns(q, e4m3_from_bits(tl.load(s_ptr + sz).to(tl.int32)).to(DT)[:, :, None], NATIVE, DT)
        w = tl.reshape(w, (BLOCK_N, BK)).to(tl.float32) * tl.load(gs_ptr + n_safe)[:, None]
    else:
        sc = tl.load(s_ptr + sz).to(tl.float32).to(DT)[:, :, None]
        zz = (tl.load(z_ptr + sz).to(tl.float32) + INT4_OFFSET).to(DT)[:, :, None]
        p = int4_parts(q, NATIVE, DT)
        w = int4_columns(((p[0] - zz) * sc, (p[1] - zz) * sc, (p[2] - zz) * sc, (p[3] - zz) * sc,
                          (p[4] - zz) * sc, (p[5] - zz) * sc, (p[6] - zz) * sc, (p[7] - zz) * sc))
        w = tl.reshape(w, (BLOCK_N, BK))
    col = tl.program_id(1) * BK + tl.arange(0, BK)
    tl.store(out_ptr + n[:, None] * K + col[None, :], w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def int4_dequant_triton(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """qweight [N, K // 8] int32, scales / qzeros [N, K // G] -> W [N, K] in dtype: the
    large-batch path dequantizes once and runs the dense GEMM, where the MMA work per
    weight dwarfs the one extra pass over it."""
    n_out, k_in = qweight.shape[0], qweight.shape[1] * 8
    group = k_in // scales.shape[1]
    out = torch.empty((n_out, k_in), dtype=dtype, device=qweight.device)
    # Tiles of up to 256 columns: whole groups where the group is a power-of-two number
    # of words, else the widest power-of-two run of words inside one group.
    if (group // 8) & (group // 8 - 1) == 0 and group <= 256 and k_in % 256 == 0:
        gw, groups = group // 8, 256 // group
    else:
        gw, groups = (group // 8) & -(group // 8), 1
        gw = min(gw, 32)
    native = native_decode()
    # bf16 arithmetic for bf16 outputs (exact up to the one rounding), fp32 otherwise.
    dt = tl.bfloat16 if native and dtype == torch.bfloat16 else tl.float32
    bn = 16
    _w4_dequant_kernel[(triton.cdiv(n_out, bn), k_in // (8 * groups * gw))](
        qweight, scales, qzeros, scales, out, n_out, k_in, qweight.stride(0), scales.stride(0),
        G=group, NVFP4=False, NATIVE=native, DT=dt, BLOCK_N=bn, GROUPS=groups, GW=gw, num_warps=4)
    return out


def nvfp4_dequant_triton(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """packed [N, K // 2] uint8, block_scale [N, K // 16] e4m3, global_scale [N] fp32 ->
    W [N, K] in dtype (the large-batch path, as int4_dequant_triton)."""
    n_out, k_in = packed.shape[0], packed.shape[1] * 2
    words = packed.contiguous().view(torch.int32)
    out = torch.empty((n_out, k_in), dtype=dtype, device=packed.device)
    groups = 16 if k_in % 256 == 0 else 1        # 256-column tiles where they fit, else one block
    native = native_decode()
    dt = tl.bfloat16 if native and dtype == torch.bfloat16 else tl.float32
    bn = 16
    _w4_dequant_kernel[(triton.cdiv(n_out, bn), k_in // (16 * groups))](
        words, block_scale.view(torch.uint8), block_scale, global_scale.float(), out, n_out, k_in, words.stride(0),
        block_scale.stride(0), G=16, NVFP4=True, NATIVE=native, DT=dt, BLOCK_N=bn, GROUPS=groups, GW=2,
        num_warps=4)
    return out


# ---- launchers --------------------------------------------------------------------------------
# Candidate tiles; on CUDA the first call per shape (eager, e.g. CUDA-graph warm-up) times
# them and keeps the fastest (kernels/splitk.py).
# GEMV: (BLOCK_N, BLOCK_K, SPLIT_K); GEMM: (BLOCK_N, BLOCK_K, warps, SPLIT_K).
GEMV_CONFIGS = ((32, 256, 2), (16, 256, 4), (32, 128, 4), (64, 128, 2), (16, 128, 8), (32, 256, 1))
# The INT4 GEMV with the register decoder: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps[, PREFETCH]);
# BLOCK_K divides the group (32 serves groups like SmolLM2's 96) or holds whole groups. The
# 256-wide tiles won every Llama-8B shape on the H200 (2026-11-30 sweep of 40 tiles,
# bench/results/h200_2026-11-30k_gemv_sweep.txt); the 128-wide and narrower ones serve
# other groups and widths. Two long tiles with 8 warps (16 x 1024, 16 x 2048, after the FP8
# GEMV's) won qkv (8.0 -> 7.3 us) and o (6.0 -> 5.6) at one row in a sweep
# (bench/results/h200_2026-11-30n_int4_long_tiles.txt); their GPU tests passed in
# h200_2026-11-30o_skinny_xw_sweep.txt and they are candidates (the tuner, timing each tile
# alone, had not picked them in that session's end-to-end runs).
INT4_GEMV_CONFIGS = ((32, 256, 4, 4, 1), (32, 256, 8, 4, 1), (32, 256, 2, 4, 1), (32, 256, 3, 4, 1),
                     (32, 256, 6, 4, 1), (16, 256, 4, 2, 1), (16, 256, 8, 2, 1), (64, 256, 8, 8, 1),
                     (32, 256, 2, 4), (32, 256, 8, 4),
                     (32, 128, 4, 4), (64, 128, 8, 4), (16, 128, 8, 4), (32, 32, 4, 4),
                     (16, 1024, 1, 8, 1), (16, 2048, 1, 8, 1))
GEMM_CONFIGS = ((64, 128, 4, 2), (32, 128, 4, 4), (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 4, 1))


def _launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
            gs: torch.Tensor | None, n_out: int, k_in: int, group: int, nvfp4: bool,
            config: tuple | None, mma: bool = False) -> torch.Tensor:
    """w: [N, K // 8] int32 words; s (and z): per-group (or per-16-block) scales [N, K // G].
    mma: the tuner may pick the MMA GEMV (kernels/int4_mma.py) up to GEMV_MAX_ROWS rows."""
    x2, y = rows_and_output(x, k_in, n_out)
    m = x2.shape[0]
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    dummy = s  # placeholder for the pointer a format does not use
    ptrs = (w, s, z if z is not None else dummy, gs if gs is not None else dummy)

    def one_group(bk: int) -> bool:
        """INT4 tiles that never leave a group read one scale and zero per row."""
        return not nvfp4 and group % bk == 0

    def decoder_tile(bk: int) -> bool:
        """The decoder GEMV's tiles: inside a group, or whole groups (NVFP4's 16-blocks, or
        INT4 groups of a power-of-two number of words)."""
        whole = bk % group == 0 and (group // 8) & (group // 8 - 1) == 0
        return k_in % bk == 0 and (whole if nvfp4 else group % bk == 0 or whole)

    decoder_tiles = [c for c in INT4_GEMV_CONFIGS if decoder_tile(c[1])]
    # A 3-tuple config asks for the plain GEMV (tests); at GEMV sizes a longer one is a decoder tile.
    explicit_mma = config is not None and config[0] == "mma"
    if explicit_mma and m > GEMV_MAX_ROWS:
        raise ValueError(f"the MMA GEMV serves at most {GEMV_MAX_ROWS} rows, got {m}")
    if m <= GEMV_MAX_ROWS and decoder_tiles and (config is None or len(config) >= 4):
        xk, pairs = x_operand(x2)

        def run(c: tuple) -> None:
            if c[0] == "mma":
                int4_mma_gemv(xk, y, w, s, z, group, c[1:], pdl_launch(x2), gs)
                return
            bn, bk, split, warps = c[:4]
            part, cnt, fixup = split_buffers(y, split, triton.cdiv(n_out, bn) * m, True)
            _decoder_gemv_kernel[(triton.cdiv(n_out, bn), split, m)](
                xk, y, part, cnt, *ptrs, m, n_out, k_in, xk.stride(0), w.stride(0), s.stride(0),
                G=group, NVFP4=nvfp4, NATIVE=native_decode(), X_PAIRS=pairs, SPLIT_K=split, FIXUP=fixup,
                BLOCK_N=bn, BLOCK_K=bk, GW=min(bk, group) // 8, PREFETCH=len(c) > 4 and bool(c[4]),
                num_warps=warps, **pdl_launch(x2))
            finish_splits(part, y, fixup)
        cands = decoder_tiles
        if mma and mma_applies(k_in, group, pairs, nvfp4):
            # The MMA GEMV costs about the same at 1 and 8 rows; the decoder GEMV's programs
            # each read the weights again for their row, so above one row only the MMA's run.
            mma_tiles = [("mma", *c) for c in INT4_MMA_CONFIGS]
            cands = cands + mma_tiles if m == 1 else mma_tiles
        key = ("decoder_gemv", nvfp4, m, n_out, k_in, group, "mma" if mma else "cuda cores")   # own candidates
    elif m <= GEMV_MAX_ROWS:
        def run(c: tuple) -> None:
            bn, bk, split = c
            part = split_output(y, split)
            _w4_gemv_kernel[(triton.cdiv(n_out, bn), split, m)](
                x2, part, *ptrs, m, n_out, k_in, x2.stride(0), w.stride(0), s.stride(0),
                G=group, NVFP4=nvfp4, ONE_GROUP=one_group(bk), SPLIT_K=split, BLOCK_N=bn,
                BLOCK_K=bk, num_warps=4)
            sum_splits(part, y)
        cands = list(GEMV_CONFIGS)
        key = ("gemv", nvfp4, m, n_out, k_in, group)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64

        def run(c: tuple) -> None:
            bn, bk, warps, split = c
            part = split_output(y, split)
            _w4_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n_out, bn), split)](
                x2, part, *ptrs, m, n_out, k_in, x2.stride(0), w.stride(0), s.stride(0),
                G=group, NVFP4=nvfp4, ONE_GROUP=one_group(bk), SPLIT_K=split, BLOCK_M=bm,
                BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3)
            sum_splits(part, y)
        cands = list(GEMM_CONFIGS)
        # Tuned per power-of-two row bucket, so varying prefill sizes do not each re-tune.
        key = ("gemm", nvfp4, bm, triton.next_power_of_2(m), n_out, k_in, group)
    run(config or choose_config(key, cands, run, x))
    return y.reshape(*x.shape[:-1], n_out)


def int4_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       qzeros: torch.Tensor, config: tuple | None = None,
                       tensor_cores: bool = True) -> torch.Tensor:
    """x: [..., K]; qweight: [N, K // 8] int32; scales, qzeros: [N, K // G] -> [..., N].
    `config`: a tile config from GEMV_CONFIGS / GEMM_CONFIGS, INT4_GEMV_CONFIGS or ("mma",
    *INT4_MMA_CONFIGS[i]) (default: tuned or the first). tensor_cores False keeps the tuner
    to the CUDA-core kernels (A/B runs)."""
    n_out, k_in = qweight.shape[0], qweight.shape[1] * 8
    group = k_in // scales.shape[1]
    return _launch(x, qweight, scales, qzeros, None, n_out, k_in, group, False, config, tensor_cores)


def nvfp4_linear_triton(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                        global_scale: torch.Tensor, config: tuple | None = None,
                        tensor_cores: bool = True) -> torch.Tensor:
    """x: [..., K]; packed: [N, K // 2] uint8; block_scale: [N, K // 16] e4m3;
    global_scale: [N] fp32 -> [..., N]. K must be a multiple of 16 (the format's block)."""
    n_out, k_in = packed.shape[0], packed.shape[1] * 2
    words = packed.contiguous().view(torch.int32)   # [N, K // 8], little-endian byte pairs
    return _launch(x, words, block_scale.view(torch.uint8), None, global_scale.float(), n_out,
                   k_in, 16, True, config, tensor_cores)
