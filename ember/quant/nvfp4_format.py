"""The NVFP4 number format: E2M1 elements, one FP8 E4M3 scale per 16 elements, one FP32
scale per tensor, two elements per byte (the first in the low nibble).

  value = e2m1 * block_scale(e4m3) * global_scale(fp32)
  global_scale = amax(tensor) / (6 * 448)     (ModelOpt's `weight_scale_2`; compressed-
                                               tensors stores its reciprocal)
  block_scale  = e4m3(amax(block) / 6 / global_scale)
"""
from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX, E4M3_MAX = 6.0, 448.0
# Magnitudes of codes 0..7; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to the even code (as the hardware's cvt.rn),
    saturating at +-6. x: any shape, float -> uint8 codes in [0, 15]."""
    a = x.abs().float()
    # Midpoints between neighbours; a tie goes to the even code, so the comparison is
    # strict where the upper neighbour's code is odd (0.25, 1.25, 2.5, 5 -> lower wins).
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
           + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    sign = ((x < 0) & (mag > 0)).to(torch.uint8) << 3
    return mag.to(torch.uint8) | sign


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] -> float32 values."""
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K // 2] uint8; element 2i in the low nibble, 2i+1 in the high."""
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K // 2] uint8 -> [..., K] codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def global_scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The FP32 per-tensor (dequant) scale that lets the largest block scale be E4M3's max."""
    return (amax.float() / (E2M1_MAX * E4M3_MAX)).clamp(min=1e-12)


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [rows, K] (K % 16 == 0) -> (packed [rows, K // 2] uint8,
    block scales [rows, K // 16] float8_e4m3fn, global scale: fp32 scalar or [rows, 1])."""
    rows, k = w.shape
    w = w.float()
    gs = global_scale_for(w.abs().amax()) if global_scale is None else global_scale.float()
    blocks = w.reshape(rows, k // BLOCK, BLOCK)
    gs_2d = gs.reshape(-1, 1) if gs.dim() else gs            # broadcasts over [rows, blocks]
    gs_b = gs_2d[..., None] if gs.dim() else gs
    block_scale = (blocks.abs().amax(-1) / E2M1_MAX / gs_2d).clamp(max=E4M3_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn)
    eff = block_scale.float()[..., None] * gs_b               # the scale actually applied
    scaled = torch.where(eff > 0, blocks / torch.where(eff > 0, eff, 1.0), 0.0)
    return pack_fp4(encode_e2m1(scaled).reshape(rows, k)), block_scale, gs


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor) -> torch.Tensor:
    """packed [rows, K // 2] uint8, block_scale [rows, K // 16] e4m3, global_scale: scalar or
    [rows] / [rows, 1] fp32 -> [rows, K] fp32."""
    vals = decode_e2m1(unpack_fp4(packed))
    rows, k = vals.shape
    gs = global_scale.float().reshape(-1, 1, 1) if global_scale.dim() else global_scale.float()
    out = vals.reshape(rows, k // BLOCK, BLOCK) * block_scale.float()[..., None] * gs
    return out.reshape(rows, k)


def fake_quantize_nvfp4_rows(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize activations [..., K], each row with its own global scale
    (dynamic, so a row's result does not depend on the rest of the batch)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    gs = global_scale_for(x2.abs().amax(-1, keepdim=True))
    packed, bs, gs = quantize_nvfp4(x2, gs)
    return dequantize_nvfp4(packed, bs, gs).reshape(shape).to(x.dtype)
