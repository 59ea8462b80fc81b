"""Quantized number formats: INT4 pack/unpack and group quantization, AutoAWQ layout
conversion, the NVFP4 value table and scale rules, FP8 and INT8 per-row scales."""
from __future__ import annotations

import pytest
import torch

from ember.quant.fp8 import FP8_MAX, quantize_fp8
from ember.quant.int4 import (AWQ_ORDER, awq_pack_cols, dequantize_int4, from_autoawq,
                              pack_int4, quantize_int4, unpack_int4)
from ember.quant.nvfp4_format import (E2M1_VALUES, decode_e2m1, dequantize_nvfp4, encode_e2m1,
                                      pack_fp4, quantize_nvfp4, unpack_fp4)
from ember.quant.smoothquant import quantize_int8_rows
from ember.quant.base import effective_group_size


# ---- INT4 -----------------------------------------------------------------------------------
def test_int4_pack_unpack_round_trip():
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 8) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), q)


def test_int4_nibble_order_is_column_order():
    q = torch.zeros(1, 8, dtype=torch.uint8)
    q[0, 3] = 0xA
    assert pack_int4(q).item() == 0xA << 12
    q = torch.full((1, 8), 15, dtype=torch.uint8)
    assert pack_int4(q).item() == -1  # all 32 bits set, as a signed int32


def test_int4_group_quant_error_within_half_step():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    q, s, z = quantize_int4(w, 64)
    assert q.max() <= 15 and s.shape == (16, 4) and z.shape == (16, 4)
    deq = dequantize_int4(pack_int4(q), s, z)
    step = s.repeat_interleave(64, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int4_exact_on_grid_values():
    # Each group holds exactly the 16 levels of its own grid: quantization is lossless.
    scale = torch.tensor([[0.1], [0.25]])
    w = (torch.arange(16).float() - 5).repeat(2, 2) * scale  # [2, 32], zero point 5
    q, s, z = quantize_int4(w, 16)
    assert torch.allclose(dequantize_int4(pack_int4(q), s, z), w, atol=1e-6)
    assert (z == 5).all()


def test_effective_group_size():
    assert effective_group_size(4096, 128) == 128
    assert effective_group_size(576, 128) == 96     # SmolLM2's hidden size
    assert effective_group_size(1536, 128) == 128
    with pytest.raises(ValueError):
        effective_group_size(4, 128)


def test_autoawq_layout_converts_to_rows_first():
    gen = torch.Generator().manual_seed(2)
    k, n, g = 64, 32, 32
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)   # ours: [out, in]
    zeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // g, generator=gen)
    # AutoAWQ GEMM: qweight [in, out / 8] with columns in AWQ_ORDER, qzeros [in / g, out / 8].
    awq_qweight = awq_pack_cols(q.t().contiguous())
    awq_qzeros = awq_pack_cols(zeros.t().contiguous())
    # Hand check of the nibble order on one word: nibble j holds column AWQ_ORDER[j].
    word = awq_qweight[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == [q[AWQ_ORDER[j], 0].item() for j in range(8)]
    assert torch.equal(from_autoawq("qweight", awq_qweight), pack_int4(q))
    assert torch.equal(from_autoawq("qzeros", awq_qzeros), zeros)
    assert torch.equal(from_autoawq("scales", scales.t().contiguous()), scales)


# ---- NVFP4 ----------------------------------------------------------------------------------
def test_e2m1_value_table():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert decode_e2m1(codes).tolist() == expected
    assert sorted(set(abs(v) for v in expected)) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    # Every representable value encodes to its own code (-0 encodes as +0).
    vals = torch.tensor(expected)
    assert torch.equal(decode_e2m1(encode_e2m1(vals)), vals.abs() * torch.sign(vals) + 0.0)


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -2.6, -0.1])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -3.0, 0.0])
    assert torch.equal(decode_e2m1(encode_e2m1(x)), want)


def test_fp4_packing_puts_the_first_element_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_fp4(packed), codes)


def test_nvfp4_scale_rules():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    packed, bs, gs = quantize_nvfp4(w)
    assert packed.shape == (4, 32) and bs.shape == (4, 4) and bs.dtype == torch.float8_e4m3fn
    # One FP32 scale per tensor: amax / (6 * 448), so the largest block scale is E4M3's max.
    assert torch.allclose(gs, w.abs().amax() / (6 * 448))
    assert bs.float().max().item() == 448.0
    # Each block's scale is E4M3(amax(block) / 6 / global).
    want = (w.reshape(4, 4, 16).abs().amax(-1) / 6 / gs).to(torch.float8_e4m3fn)
    assert torch.equal(bs.float(), want.float())
    # Dequantized: every element is a table value times its block's scale.
    deq = dequantize_nvfp4(packed, bs, gs)
    ratio = deq.reshape(4, 4, 16) / (bs.float()[..., None] * gs)
    assert torch.isin(ratio.abs().round(decimals=4), torch.tensor(E2M1_VALUES)).all()
    # And the error is at most half the widest gap (1 of 4..6) in scaled units.
    assert ((deq - w).abs().reshape(4, 4, 16) <= bs.float()[..., None] * gs * 1.0 + 1e-6).all()


# ---- FP8 / INT8 -----------------------------------------------------------------------------
def test_fp8_and_int8_row_scales():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4)) * torch.tensor([[1.0], [10.0], [0.01]])
    q, s = quantize_fp8(x, per_row=True)
    assert torch.allclose(s[:, 0], x.abs().amax(-1) / FP8_MAX)
    assert torch.allclose(q.float() * s, x, rtol=0.07, atol=0)
    q, s = quantize_fp8(x, per_row=False)
    assert s.numel() == 1
    qi, si = quantize_int8_rows(x)
    assert qi.abs().max(-1).values.tolist() == [127, 127, 127]
    assert ((qi.float() * si - x).abs() <= si / 2 + 1e-7).all()
