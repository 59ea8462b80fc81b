"""Dispatch for the quantized GEMMs: Triton kernels on CUDA, the torch reference elsewhere.

Each Triton kernel lives beside its torch reference (`*_ref`); tests compare the two under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.quant.int4 import dequantize_int4


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    qzeros: torch.Tensor) -> torch.Tensor:
    """x: [..., in]; qweight: [out, in // 8] int32; scales, qzeros: [out, in // g] -> [..., out]."""
    w = dequantize_int4(qweight, scales, qzeros).to(x.dtype)
    return F.linear(x, w)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                qzeros: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from ember.quant.kernels.w4a16 import int4_linear_triton
        return int4_linear_triton(x, qweight, scales, qzeros)
    return int4_linear_ref(x, qweight, scales, qzeros)


def nvfp4_linear_ref(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor) -> torch.Tensor:
    """x: [..., in]; packed: [out, in // 2] uint8; block_scale: [out, in // 16] e4m3;
    global_scale: [out] fp32 -> [..., out]."""
    from ember.quant.nvfp4_format import dequantize_nvfp4
    return F.linear(x, dequantize_nvfp4(packed, block_scale, global_scale).to(x.dtype))


def nvfp4_linear(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                 global_scale: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from ember.quant.kernels.w4a16 import nvfp4_linear_triton
        return nvfp4_linear_triton(x, packed, block_scale, global_scale)
    return nvfp4_linear_ref(x, packed, block_scale, global_scale)
