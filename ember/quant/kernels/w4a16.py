"""Triton W4A16 kernels: y = x @ dequant(W)^T with the dequantization fused into the GEMM,
for ember's INT4 (AWQ/RTN) and NVFP4 layouts. Torch references: `int4_linear_ref`,
`nvfp4_linear_ref` in kernels/__init__.py.

Both formats are read as int32 words of eight 4-bit codes (NVFP4's byte pairs, viewed as
little-endian int32, put column 8w + j in nibble j exactly as INT4 packs them), so one
tile loader serves both: one load per word, nibbles split by shifts, one scale (and zero)
per row per group or 16-column block, broadcast over its columns.

- GEMV (M <= GEMV_MAX_ROWS, decode): one program per (BLOCK_N outputs, K split, row); the
  dequantized tile is multiplied by x and accumulated in a 2-D register tile that is
  reduced once at the end (tl.dot needs 16 rows).
- GEMM (batched): tiles [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] through tl.dot, per K split.
- Split-K (kernels/splitk.py): more programs than output tiles alone give.

Launchers allocate only their outputs, so they are CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.quant.kernels.splitk import choose_config, k_range, split_output, sum_splits

GEMV_MAX_ROWS = 8


# ---- dequantization (inlined into the kernels) ------------------------------------------------
@triton.jit
def _expand(v, BLOCK_N: tl.constexpr, PER: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // PER] -> [BLOCK_N, BLOCK_K]: each value repeated over PER columns."""
    v3 = tl.broadcast_to(v[:, :, None], (BLOCK_N, BLOCK_K // PER, PER))
    return tl.reshape(v3, (BLOCK_N, BLOCK_K))


@triton.jit
def _e2m1(code):
    """E2M1 codes (int32, 0..15) -> values: e == 0 is subnormal (0, 0.5); else 2^(e-1)(1 + m/2)."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, ((1 << e) >> 1).to(tl.float32) * (1.0 + 0.5 * m))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def e4m3_from_bits(byte):
    """Positive E4M3 bytes (int32; bias 7; e == 0 subnormal m * 2^-9) -> fp32. Read as
    bytes: portable, and the interpreter has no fp8."""
    e = (byte >> 3) & 0xF
    m = (byte & 7).to(tl.float32)
    return tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2((e - 10).to(tl.float32)))


@triton.jit
def _w4_tile(w_ptr, s_ptr, z_ptr, n, n_mask, k0, stride_wn, stride_sn,
             G: tl.constexpr, NVFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized weights [BLOCK_N, BLOCK_K] for rows n ([BLOCK_N]) and columns k0.. (fp32;
    NVFP4 without its per-row global scale, which the caller applies to the output)."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    q = tl.load(w_ptr + n[:, None] * stride_wn + words[None, :], mask=n_mask[:, None], other=0)
    shifts = tl.arange(0, 8) * 4
    q = (q[:, :, None] >> shifts[None, None, :]) & 0xF                 # [BN, BK // 8, 8]
    q = tl.reshape(q, (BLOCK_N, BLOCK_K))
    if NVFP4:
        # One E4M3 scale per 16 columns (BLOCK_K is a multiple of 16).
        blocks = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        sb = tl.load(s_ptr + n[:, None] * stride_sn + blocks[None, :], mask=n_mask[:, None], other=0)
        return _e2m1(q) * _expand(e4m3_from_bits(sb.to(tl.int32)), BLOCK_N, 16, BLOCK_K)
    elif BLOCK_K <= G:
        # The tile lies inside one group: one scale and zero per row.
        g = k0 // G
        sc = tl.load(s_ptr + n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
        return (q.to(tl.float32) - zp[:, None]) * sc[:, None]
    else:
        # Several whole groups per tile (G a power of two dividing BLOCK_K).
        gs = k0 // G + tl.arange(0, BLOCK_K // G)
        off = n[:, None] * stride_sn + gs[None, :]
        sc = tl.load(s_ptr + off, mask=n_mask[:, None], other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + off, mask=n_mask[:, None], other=0).to(tl.float32)
        return (q.to(tl.float32) - _expand(zp, BLOCK_N, G, BLOCK_K)) * _expand(sc, BLOCK_N, G, BLOCK_K)


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _w4_gemv_kernel(x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K, stride_xm,
                    stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (N tiles, SPLIT_K, M). out: y [M, N] when SPLIT_K == 1, else fp32 partials
    [SPLIT_K, M, N]."""
    m = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    start, end = k_range(K, SPLIT_K, BLOCK_K)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        w = _w4_tile(w_ptr, s_ptr, z_ptr, n, n_mask, k0, stride_wn, stride_sn, G, NVFP4,
                     BLOCK_N, BLOCK_K)
        acc2 += w * x[None, :]
    acc = tl.sum(acc2, axis=1)
    if NVFP4:
        acc *= tl.load(gs_ptr + n, mask=n_mask, other=0.0)
    dst = out_ptr + (tl.program_id(1) * M + m) * N + n
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _w4_gemm_kernel(x_ptr, out_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K, stride_xm,
                    stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Grid (M tiles x N tiles, SPLIT_K). out as in the GEMV."""
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    start, end = k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm < M)[:, None], other=0.0)
        w = _w4_tile(w_ptr, s_ptr, z_ptr, n, n_mask, k0, stride_wn, stride_sn, G, NVFP4,
                     BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if NVFP4:
        acc *= tl.load(gs_ptr + n, mask=n_mask, other=0.0)[None, :]
    dst = out_ptr + (tl.program_id(1) * M + rm[:, None]) * N + n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & n_mask[None, :])


# ---- launchers --------------------------------------------------------------------------------
def _block_k(group: int, want: int) -> int:
    """The tile width for a group size: `want` when groups are a power of two (a tile then
    holds part of a group or whole groups), else the largest power of two <= want dividing
    the group (a tile never straddles a group)."""
    if group & (group - 1) == 0:
        return want
    bk = want
    while group % bk:
        bk //= 2
    return bk


# Candidate tiles; on CUDA the first call per shape (eager, e.g. CUDA-graph warm-up) times
# them and keeps the fastest (kernels/splitk.py).
# GEMV: (BLOCK_N, BLOCK_K, SPLIT_K); GEMM: (BLOCK_N, BLOCK_K, warps, SPLIT_K).
GEMV_CONFIGS = ((32, 256, 2), (16, 256, 4), (32, 128, 4), (64, 128, 2), (16, 128, 8), (32, 256, 1))
GEMM_CONFIGS = ((64, 128, 4, 2), (32, 128, 4, 4), (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 4, 1))


def _launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
            gs: torch.Tensor | None, n_out: int, k_in: int, group: int, nvfp4: bool,
            config: tuple | None) -> torch.Tensor:
    """w: [N, K // 8] int32 words; s (and z): per-group (or per-16-block) scales [N, K // G]."""
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    dummy = s  # placeholder for the pointer a format does not use
    ptrs = (w, s, z if z is not None else dummy, gs if gs is not None else dummy)
    # BLOCK_K must divide K (masks cover N and M only); NVFP4 tiles hold whole 16-blocks.
    kmax = k_in & -k_in

    def bk_for(want: int) -> int:
        return min(_block_k(group, want), kmax, want)

    if m <= GEMV_MAX_ROWS:
        def run(c: tuple) -> None:
            bn, bk, split = c
            part = split_output(y, split)
            _w4_gemv_kernel[(triton.cdiv(n_out, bn), split, m)](
                x2, part, *ptrs, m, n_out, k_in, x2.stride(0), w.stride(0), s.stride(0),
                G=group, NVFP4=nvfp4, SPLIT_K=split, BLOCK_N=bn, BLOCK_K=bk_for(bk), num_warps=4)
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
                G=group, NVFP4=nvfp4, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_K=bk_for(bk), num_warps=warps, num_stages=3)
            sum_splits(part, y)
        cands = list(GEMM_CONFIGS)
        # Tuned per power-of-two row bucket, so varying prefill sizes do not each re-tune.
        key = ("gemm", nvfp4, bm, triton.next_power_of_2(m), n_out, k_in, group)
    run(config or choose_config(key, cands, run, x))
    return y.reshape(*x.shape[:-1], n_out)


def int4_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       qzeros: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """x: [..., K]; qweight: [N, K // 8] int32; scales, qzeros: [N, K // G] -> [..., N].
    `config`: a tile config from GEMV_CONFIGS / GEMM_CONFIGS (default: tuned or the first)."""
    n_out, k_in = qweight.shape[0], qweight.shape[1] * 8
    group = k_in // scales.shape[1]
    return _launch(x, qweight, scales, qzeros, None, n_out, k_in, group, False, config)


def nvfp4_linear_triton(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                        global_scale: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """x: [..., K]; packed: [N, K // 2] uint8; block_scale: [N, K // 16] e4m3;
    global_scale: [N] fp32 -> [..., N]. K must be a multiple of 16 (the format's block)."""
    n_out, k_in = packed.shape[0], packed.shape[1] * 2
    words = packed.contiguous().view(torch.int32)   # [N, K // 8], little-endian byte pairs
    return _launch(x, words, block_scale.view(torch.uint8), None, global_scale.float(), n_out,
                   k_in, 16, True, config)
