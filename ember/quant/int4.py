"""Group-wise asymmetric INT4: quantize (round to nearest), pack, unpack, dequantize,
and conversion from AutoAWQ's GEMM layout.

ember's layout (all rows-first):
  qweight [out, in // 8] int32: word w of a row holds input columns 8w..8w+7, column
          8w+j in bits 4j..4j+3 (so unpacking is a shift by 4 * (k % 8));
  scales  [out, in // g] float;  qzeros [out, in // g] uint8 in [0, 15];
  w[o, k] = (q[o, k] - qzeros[o, k // g]) * scales[o, k // g].
"""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)          # nibble j -> bit 4j
# AutoAWQ packs output columns 8w + AWQ_ORDER[j] into nibble j of word w.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [..., K] integers in [0, 15], K % 8 == 0 -> [..., K // 8] int32 (column 8w+j in nibble j)."""
    assert q.shape[-1] % 8 == 0, "packing needs a multiple of 8 columns"
    nib = q.to(torch.int64).reshape(*q.shape[:-1], -1, 8) << _SHIFTS.to(q.device, torch.int64)
    # The nibbles occupy disjoint bits, so their sum is their bitwise or; then reinterpret
    # the unsigned 32-bit word as int32 (two's complement).
    word = nib.sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed: [..., K // 8] int32 -> [..., K] uint8 in [0, 15]."""
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return nib.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (q [out, in] uint8, scales [out, in // g] fp32, zeros [out, in // g] uint8).

    Asymmetric min/max per group: the range [min, max] (widened to hold 0) maps onto 0..15.
    """
    out, k = w.shape
    g = w.float().reshape(out, k // group_size, group_size)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, 15)
    return q.reshape(out, k).to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """qweight [out, in // 8] int32, scales/qzeros [out, in // g] -> w [out, in] fp32."""
    q = unpack_int4(qweight).float()
    out, k = q.shape
    groups = scales.shape[1]
    q = q.reshape(out, groups, k // groups)
    w = (q - qzeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(out, k)


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize then dequantize (used by the AWQ search): [out, in] -> [out, in] fp32."""
    q, s, z = quantize_int4(w, group_size)
    out, k = w.shape
    deq = (q.float().reshape(out, -1, group_size) - z.float()[..., None]) * s[..., None]
    return deq.reshape(out, k)


# ---- AutoAWQ GEMM layout ------------------------------------------------------------------
def _awq_unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ-packed [rows, out // 8] int32 -> [rows, out] uint8 in natural column order."""
    nib = unpack_int4(packed)                                   # nibble order
    rows, n = nib.shape
    nib = nib.reshape(rows, n // 8, 8)
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib                             # nibble j is column AWQ_ORDER[j]
    return out.reshape(rows, n)


def awq_pack_cols(q: torch.Tensor) -> torch.Tensor:
    """[rows, out] ints in [0, 15] -> AutoAWQ-packed [rows, out // 8] int32 (tests, export)."""
    rows, n = q.shape
    q = q.reshape(rows, n // 8, 8)[..., list(AWQ_ORDER)]
    return pack_int4(q.reshape(rows, n))


def from_autoawq(kind: str, tensor: torch.Tensor) -> torch.Tensor:
    """One AutoAWQ GEMM tensor -> ember's rows-first layout.

    qweight [in, out // 8] int32 -> [out, in // 8]; qzeros [in // g, out // 8] int32 ->
    [out, in // g] uint8; scales [in // g, out] -> [out, in // g].
    """
    if kind == "qweight":
        return pack_int4(_awq_unpack_cols(tensor).t().contiguous())
    if kind == "qzeros":
        return _awq_unpack_cols(tensor).t().contiguous()
    if kind == "scales":
        return tensor.t().contiguous()
    return tensor
