"""Triton W4A16 kernels (INT4 and NVFP4, GEMV and GEMM paths) against their torch
references, through Triton's interpreter on the CPU (compiled on a GPU)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET before this module",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the Triton kernels need triton")

from ember.quant.int4 import pack_int4, quantize_int4  # noqa: E402
from ember.quant.kernels import int4_linear_ref, nvfp4_linear_ref  # noqa: E402
from ember.quant.kernels.w4a16 import int4_linear_triton, nvfp4_linear_triton  # noqa: E402
from ember.quant.nvfp4_format import quantize_nvfp4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int4_weight(n: int, k: int, group: int, seed: int):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s, z = quantize_int4(w, group)
    return pack_int4(q).to(DEVICE), s.to(DEVICE), z.to(DEVICE)


# rows 1 and 3 take the GEMV path, 20 the GEMM path; N not a multiple of the block; group 96
# (SmolLM2's) makes BLOCK_K 32.
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("n,k,group", [(40, 256, 128), (48, 192, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_kernel_matches_reference(m, n, k, group, dtype):
    qw, s, z = _int4_weight(n, k, group, seed=m + n)
    s = s.to(dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    want = int4_linear_ref(x.float(), qw, s.float(), z)
    got = int4_linear_triton(x, qw, s, z).float()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 5, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [256, 48])  # 48: K not a multiple of a 32-wide tile
def test_nvfp4_kernel_matches_reference(m, dtype, k):
    n = 40
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    packed, bs, gs = quantize_nvfp4(w)
    gs_rows = torch.linspace(0.5, 2.0, n) * gs          # per-row global scales (merged shards)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    args = (packed.to(DEVICE), bs.to(DEVICE), gs_rows.to(DEVICE))
    want = nvfp4_linear_ref(x.float(), *args)
    got = nvfp4_linear_triton(x, *args).float()
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_nvfp4_kernel_decodes_every_code_and_subnormal_scales():
    # All 16 E2M1 codes in a row, with block scales covering E4M3 subnormals and normals.
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)                     # [32]
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 16)
    bs = torch.tensor([[0.001953125 * 3, 416.0]]).to(torch.float8_e4m3fn)     # subnormal, normal
    gs = torch.tensor([1.0])
    x = torch.eye(32)
    want = nvfp4_linear_ref(x, packed, bs, gs)
    got = nvfp4_linear_triton(x.to(DEVICE), packed.to(DEVICE), bs.to(DEVICE), gs.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


from ember.quant.kernels.w4a16 import GEMM_CONFIGS, GEMV_CONFIGS  # noqa: E402


@pytest.mark.parametrize("config", GEMV_CONFIGS + GEMM_CONFIGS)
def test_int4_kernel_every_tile_config(config):
    # The GEMV configs (3-tuples) at 2 rows and the GEMM configs at 17. Group 64 with
    # 128- and 256-wide tiles puts several groups in a tile; split-K leaves splits empty.
    m = 2 if len(config) == 3 else 17
    qw, s, z = _int4_weight(136, 256, 64, seed=9)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = int4_linear_ref(x, qw, s, z)
    torch.testing.assert_close(int4_linear_triton(x, qw, s, z, config=config), want,
                               rtol=1e-3, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("config", [(16, 128, 2), (32, 64, 4, 2)])
def test_nvfp4_kernel_split_k(config):
    # Split-K partials summed by the reduce kernel, GEMV and GEMM, 16-blocks inside a tile.
    m = 2 if len(config) == 3 else 17
    w = torch.randn(24, 512, generator=torch.Generator().manual_seed(4)) * 0.05
    packed, bs, gs = quantize_nvfp4(w)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    args = (packed.to(DEVICE), bs.to(DEVICE), gs.expand(24).contiguous().to(DEVICE))
    want = nvfp4_linear_ref(x, *args)
    torch.testing.assert_close(nvfp4_linear_triton(x, *args, config=config), want,
                               rtol=1e-3, atol=1e-3 * want.abs().max().item())


def _fp8_gemv_configs() -> list[tuple]:
    """Every tile the autotuner may pick on a GPU; two on the CPU (the interpreter is slow)."""
    from ember.quant.kernels.fp8_gemv import CONFIGS
    return list(CONFIGS) if DEVICE == "cuda" else [(16, 128, 1, 4), (16, 64, 4, 2)]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", _fp8_gemv_configs())
def test_fp8_gemv_matches_reference(m, config):
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels import fp8_linear_ref
    from ember.quant.kernels.fp8_gemv import fp8_gemv_triton
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(6))
    q, s = quantize_fp8(w, per_row=True)
    # Every E4M3 byte but the two NaNs, signs and subnormals included, in the first row.
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)
    q[0, :codes.numel()] = codes.view(torch.float8_e4m3fn)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    args = (q.to(DEVICE), s.reshape(-1).to(DEVICE))
    want = fp8_linear_ref(x, *args)
    torch.testing.assert_close(fp8_gemv_triton(x, *args, config=config), want,
                               rtol=1e-4, atol=1e-4 * want.abs().max().item())
