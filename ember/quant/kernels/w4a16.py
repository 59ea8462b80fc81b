"""Triton W4A16 kernels: y = x @ dequant(W)^T with the dequantization fused into the GEMM,
for ember's INT4 (AWQ/RTN) and NVFP4 layouts. Torch references: `int4_linear_ref`,
`nvfp4_linear_ref` in kernels/__init__.py.

- GEMV (M <= GEMV_MAX_ROWS, decode): one program per (BLOCK_N outputs, row); the weight
  tile is dequantized in registers and reduced with a broadcast multiply-sum (tl.dot needs
  16 rows). Rows beyond the first re-read the weights from L2.
- GEMM (batched): tiles [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] with tl.dot.

Packed words are read once per unpacked element (`k // 8` or `k // 2` offsets); the
repeats hit L1. Launchers allocate only the output, so they are CUDA-graph capturable.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 8


# ---- dequantization helpers (inlined into the kernels) ----------------------------------------
@triton.jit
def _int4_tile(qw_ptr, s_ptr, z_ptr, n, k, n_mask, G: tl.constexpr, stride_qn, stride_sn):
    """Dequantized INT4 weights, tile [BK, BN] (n: [1, BN], k: [BK, 1]) or [BN, BK]
    (n: [BN, 1], k: [1, BK]). A tile lies inside one group (BLOCK_K divides G)."""
    q = tl.load(qw_ptr + n * stride_qn + k // 8, mask=n_mask, other=0)
    q = (q >> ((k % 8) * 4)) & 0xF
    g = (k // G)
    s = tl.load(s_ptr + n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _nvfp4_tile(p_ptr, bs_ptr, n, k, n_mask, stride_pn, stride_bn):
    """Dequantized NVFP4 weights (without the per-tensor scale, applied to the output)."""
    byte = tl.load(p_ptr + n * stride_pn + k // 2, mask=n_mask, other=0).to(tl.int32)
    code = (byte >> ((k % 2) * 4)) & 0xF
    e = (code >> 1) & 3
    b = (code & 1).to(tl.float32)
    # E2M1: e == 0 is subnormal (0, 0.5); else 2^(e-1) * (1 + b / 2).
    mag = tl.where(e == 0, 0.5 * b, ((1 << e) >> 1).to(tl.float32) * (1.0 + 0.5 * b))
    val = tl.where((code & 8) != 0, -mag, mag)
    # Block scale: E4M3 (bias 7) read as bytes; e == 0 is subnormal m * 2^-9.
    sb = tl.load(bs_ptr + n * stride_bn + k // 16, mask=n_mask, other=0).to(tl.int32)
    se = (sb >> 3) & 0xF
    sm = (sb & 7).to(tl.float32)
    scale = tl.where(se == 0, sm * 0.001953125, (8.0 + sm) * tl.exp2((se - 10).to(tl.float32)))
    return val * scale


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
def _w4_gemv_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, N, K, stride_xm, stride_ym,
                    stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (n < N)[:, None]
    # Products accumulate in a 2-D tile, reduced once after the loop (not every step).
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + kk).to(tl.float32)
        if NVFP4:
            w = _nvfp4_tile(w_ptr, s_ptr, n[:, None], kk[None, :], n_mask, stride_wn, stride_sn)
        else:
            # One load per packed word (8 weights), unpacked by shifts; one scale and zero
            # per row for the tile (BLOCK_K divides the group).
            words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            q = tl.load(w_ptr + n[:, None] * stride_wn + words[None, :], mask=n_mask, other=0)
            shifts = tl.arange(0, 8) * 4
            q = (q[:, :, None] >> shifts[None, None, :]) & 0xF       # [BN, BK // 8, 8]
            q = tl.reshape(q, (BLOCK_N, BLOCK_K))
            g = k0 // G
            sc = tl.load(s_ptr + n * stride_sn + g, mask=n < N, other=0.0).to(tl.float32)
            zp = tl.load(z_ptr + n * stride_sn + g, mask=n < N, other=0).to(tl.float32)
            w = (q.to(tl.float32) - zp[:, None]) * sc[:, None]
        acc2 += w * x[None, :]
    acc = tl.sum(acc2, axis=1)
    if NVFP4:
        acc *= tl.load(gs_ptr + n, mask=n < N, other=0.0)
    tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _w4_gemm_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K, stride_xm, stride_ym,
                    stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm < M)[:, None], other=0.0)
        if NVFP4:
            w = _nvfp4_tile(w_ptr, s_ptr, n[None, :], kk[:, None], n_mask, stride_wn, stride_sn)
        else:
            w = _int4_tile(w_ptr, s_ptr, z_ptr, n[None, :], kk[:, None], n_mask, G,
                           stride_wn, stride_sn)
        acc += tl.dot(x, w.to(x.dtype))
    if NVFP4:
        acc *= tl.load(gs_ptr + n, mask=n < N, other=0.0)[None, :]
    out_mask = (rm < M)[:, None] & (n < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ---- launchers --------------------------------------------------------------------------------
def _block_k(group: int, cap: int = 128) -> int:
    """The largest power of two <= cap dividing the group (a tile never straddles groups)."""
    bk = cap
    while group % bk:
        bk //= 2
    return bk


# Candidate tile shapes; on CUDA the first call per shape (eager, e.g. CUDA-graph warm-up)
# times them and keeps the fastest. Set EMBER_W4A16_AUTOTUNE=0 to use the first candidate.
GEMV_CONFIGS = ((32, 128), (16, 128), (64, 64), (128, 32))            # (BLOCK_N, BLOCK_K)
GEMM_CONFIGS = ((32, 64, 4), (64, 64, 4), (128, 64, 4), (64, 128, 8))  # (BLOCK_N, BLOCK_K, warps)
AUTOTUNE = os.environ.get("EMBER_W4A16_AUTOTUNE", "1") == "1"
_TUNED: dict[tuple, tuple] = {}


def _time_ms(fn, reps: int = 10) -> float:
    fn()  # compile
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _choose(key: tuple, candidates: list[tuple], run, x: torch.Tensor) -> tuple:
    if key in _TUNED:
        return _TUNED[key]
    if not (AUTOTUNE and x.is_cuda) or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    _TUNED[key] = min(candidates, key=lambda c: _time_ms(lambda: run(c)))
    return _TUNED[key]


def _launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
            gs: torch.Tensor | None, n_out: int, k_in: int, group: int, nvfp4: bool,
            config: tuple | None) -> torch.Tensor:
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    dummy = s  # placeholder for the pointer a format does not use
    args = (x2, y, w, s, z if z is not None else dummy, gs if gs is not None else dummy)
    gmax = _block_k(group)
    if m <= GEMV_MAX_ROWS:
        def run(c: tuple) -> None:
            bn, bk = c
            _w4_gemv_kernel[(triton.cdiv(n_out, bn), m)](
                *args, n_out, k_in, x2.stride(0), y.stride(0), w.stride(0), s.stride(0),
                G=group, NVFP4=nvfp4, BLOCK_N=bn, BLOCK_K=min(bk, gmax), num_warps=4)
        cands = list(GEMV_CONFIGS)
        key = ("gemv", nvfp4, m, n_out, k_in, group)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64

        def run(c: tuple) -> None:
            bn, bk, warps = c
            _w4_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n_out, bn))](
                *args, m, n_out, k_in, x2.stride(0), y.stride(0), w.stride(0), s.stride(0),
                G=group, NVFP4=nvfp4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, gmax),
                num_warps=warps, num_stages=3)
        cands = list(GEMM_CONFIGS)
        # Tuned per power-of-two row bucket, so varying prefill sizes do not each re-tune.
        key = ("gemm", nvfp4, bm, triton.next_power_of_2(m), n_out, k_in, group)
    run(config or _choose(key, cands, run, x))
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
    global_scale: [N] fp32 -> [..., N]."""
    n_out, k_in = packed.shape[0], packed.shape[1] * 2
    # E4M3 bytes are decoded in the kernel (no fp8 loads: portable, and the interpreter has no fp8).
    # BLOCK_K must divide K (a multiple of 16): treat the largest power-of-two divisor <= 128
    # as the "group" the tiles stay inside.
    return _launch(x, packed, block_scale.view(torch.uint8), None, global_scale.float(), n_out,
                   k_in, _block_k(k_in), True, config)
