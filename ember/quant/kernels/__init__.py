"""Quantized GEMM kernels. The Triton kernels (w4a16.py) run on CUDA; their torch
references here define what they compute, and tests compare the two under
TRITON_INTERPRET=1. (On the CPU the linear methods use their once-dequantized weights.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.quant.int4 import dequantize_int4
from ember.quant.nvfp4_format import dequantize_nvfp4


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    qzeros: torch.Tensor) -> torch.Tensor:
    """x: [..., in]; qweight: [out, in // 8] int32; scales, qzeros: [out, in // g] -> [..., out]."""
    return F.linear(x, dequantize_int4(qweight, scales, qzeros).to(x.dtype))


def nvfp4_linear_ref(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor) -> torch.Tensor:
    """x: [..., in]; packed: [out, in // 2] uint8; block_scale: [out, in // 16] e4m3;
    global_scale: [out] fp32 -> [..., out]."""
    return F.linear(x, dequantize_nvfp4(packed, block_scale, global_scale).to(x.dtype))


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., in]; weight: [out, in] float8_e4m3fn; scale: [out] fp32 -> [..., out]
    (weight-only: x is not quantized)."""
    return F.linear(x, (weight.float() * scale[:, None]).to(x.dtype))
