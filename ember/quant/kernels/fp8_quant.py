"""Dynamic per-token FP8 (E4M3) quantization of activations in one Triton launch: each
row's absolute maximum, its scale amax * (1 / 448) (at least 1e-12), and the row divided
by it, rounded to E4M3. Torch reference: `ember.quant.fp8.quantize_fp8(x, per_row=True)`, which
this reproduces bit for bit.

Why: W8A8 prefill (torch._scaled_mm) quantizes the input of every linear layer, and the
torch reference is about nine launches (abs, amax, divide, clamp, cast, ...) per layer,
~1,100 per Llama-8B prefill, all eager: on the H200 an FP8 prefill of one 128-token prompt
took 29-60 ms against bf16's 22-25 ms (bench/results/h200_2026-11-30m_*_quant_e2e.txt).

The E4M3 rounding is done on the fp32 bits (round to nearest even), not with Triton's
fp8 cast: the interpreter's cast rounds wrongly at binade edges (-126.3 -> -64,
bench/results/cpu_2026-11-30m_sass_fp8_gemv.txt), and the tests run on it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.layers.pdl import pdl_launch

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def e4m3_code(v):
    """fp32 values with |v| <= 448 -> E4M3 codes (int32 0..255), rounded to nearest even:
    normals by rounding the fp32 bits to 3 mantissa bits and rebiasing the exponent
    (127 -> 7), subnormals (|v| < 2^-6, steps of 2^-9) by the 2^23 magic-number rint."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    mag = a.to(tl.float32, bitcast=True)
    sub = ((mag * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(mag < 0.015625, sub, normal) | sign


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    """One program per row: x [M, K] (any float dtype) -> q [M, K] uint8 E4M3 codes,
    s [M] fp32."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0) * (1.0 / FP8_MAX), 1e-12)   # as quantize_fp8
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * stride_q + k0 + cols, e4m3_code(v).to(tl.uint8), mask=mask)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (float8_e4m3fn [M, K], scale fp32 [M, 1]), as quantize_fp8(x, True)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                 num_warps=8 if block >= 2048 else 4, **pdl_launch(x))
    return q.view(torch.float8_e4m3fn), s
