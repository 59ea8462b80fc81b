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


def _int4_decoder_configs() -> list[tuple]:
    from ember.quant.kernels.w4a16 import INT4_GEMV_CONFIGS
    return (list(INT4_GEMV_CONFIGS) if DEVICE == "cuda"
            else [(16, 128, 8, 4), (32, 32, 4, 4), (8, 256, 2, 2, 1), (16, 512, 4, 4), (16, 1024, 1, 8, 1)])


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", _int4_decoder_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_decoder_gemv_every_tile_config(m, config, dtype):
    # The register-decoder GEMV: tiles inside one group (group 128 over K = 512 with splits,
    # or SmolLM2's group 96 for 32-wide tiles) and tiles of whole groups (K = 2048: group 64
    # for 256-wide tiles, else 128; splits left empty); N = 72 is no multiple of BLOCK_N.
    # bf16 activations are read as int32 pairs (decode.x_pair).
    bk = config[1]
    group, k = (96, 192) if bk == 32 else (128, 512) if bk <= 128 else (64 if bk == 256 else 128, 2048)
    qw, s, z = _int4_weight(72, k, group, seed=m + 11)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    want = int4_linear_ref(x.float(), qw, s, z)
    got = int4_linear_triton(x, qw, s, z, config=config).float()
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def _int4_mma_configs() -> list[tuple]:
    from ember.quant.kernels.int4_mma import INT4_MMA_CONFIGS
    configs = list(INT4_MMA_CONFIGS) if DEVICE == "cuda" else [(4, 2, 1, 0, 0), (2, 1, 2, 1, 0), (2, 2, 1, 0, 1), (2, 1, 4, 0, 1)]
    return [("mma", *c) for c in configs]


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", _int4_mma_configs())
@pytest.mark.parametrize("k,group", [(1024, 128), (384, 128), (1024, 256)])
def test_int4_mma_gemv_every_config(m, config, k, group):
    # The tensor-core GEMV (kernels/int4_mma.py): N = 72 is no multiple of its 16 rows; K =
    # 384 leaves warps and splits without a step (masked), K = 1024 fills them for most
    # configs (unmasked); group 256 spans two steps. On the CPU the interpreter computes
    # each MMA from the lanes' fragments as the hardware would add them up.
    qw, s, z = _int4_weight(72, k, group, seed=m + 5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 1)).to(DEVICE, torch.bfloat16)
    want = int4_linear_ref(x.float(), qw, s, z)
    got = int4_linear_triton(x, qw, s, z, config=config).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", _int4_mma_configs())
@pytest.mark.parametrize("k", [1024, 384])
def test_nvfp4_mma_gemv_every_config(m, config, k):
    # NVFP4 on the tensor-core GEMV: E2M1 codes looked up into bf16, times their block's
    # E4M3 scale in bf16 (exact) before the MMA, the per-row global scale after. Every code
    # and -0 present, subnormal block scales among the normal ones, N = 72 no multiple of 16,
    # K = 384 leaves warps and splits without a step (masked).
    args = _nvfp4_weight_every_code(72, k, seed=m + 30)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 31)).to(DEVICE, torch.bfloat16)
    want = nvfp4_linear_ref(x.float(), *args)
    got = nvfp4_linear_triton(x, *args, config=config).float()       # bf16 out
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_int4_mma_gemv_is_a_candidate_only_where_it_applies():
    from ember.quant.kernels.int4_mma import mma_applies
    assert mma_applies(4096, 128, True) and mma_applies(14336, 128, True)
    assert not mma_applies(576, 96, True)          # SmolLM2's group 96
    assert not mma_applies(4096, 128, False)       # fp32 / fp16 activations
    assert mma_applies(4096, 16, True, nvfp4=True) and not mma_applies(4080, 16, True, nvfp4=True)
    qw, s, z = _int4_weight(16, 256, 128, seed=0)
    with pytest.raises(ValueError, match="int32 pairs"):
        int4_linear_triton(torch.randn(1, 256, device=DEVICE), qw, s, z, config=("mma", 4, 1, 1, 0, 0))
    with pytest.raises(ValueError, match="at most 8 rows"):
        int4_linear_triton(torch.zeros(9, 256, device=DEVICE, dtype=torch.bfloat16), qw, s, z,
                           config=("mma", 4, 1, 1, 0, 0))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", _int4_decoder_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_decoder_gemv_every_tile_config(m, config, dtype):
    # The NVFP4 GEMV through the register decoder (tiles of whole 16-column blocks; bf16
    # x in packed bf16 math, the E2M1 bits looked up by prmt), every code and sign present;
    # K = 512 with empty splits (or one tile of a longer one), N = 72 no multiple of
    # BLOCK_N, per-row global scales.
    n, k = 72, max(512, config[1])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(m + 20)) * 0.05
    packed, bs, gs = quantize_nvfp4(w)
    packed[::5, 3] = (packed[::5, 3] & 0xF0) | 8          # -0, which quantization never gives
    codes = torch.stack([packed & 0xF, packed >> 4], -1)
    assert len(torch.unique(codes)) == 16
    gs_rows = torch.linspace(0.5, 2.0, n) * gs
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    args = (packed.to(DEVICE), bs.to(DEVICE), gs_rows.to(DEVICE))
    want = nvfp4_linear_ref(x.float(), *args)
    got = nvfp4_linear_triton(x, *args, config=config).float()
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


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
    """Every tile the autotuner may pick on a GPU; a few on the CPU (the interpreter is
    slow; there the L2 prefetch of AHEAD tiles is skipped, its addresses still computed)."""
    from ember.quant.kernels.fp8_gemv import CONFIGS
    return list(CONFIGS) if DEVICE == "cuda" else [(16, 128, 1, 4), (16, 64, 4, 2), (16, 128, 2, 4, 1),
                                                   (16, 128, 2, 4, 0, 1), (16, 128, 2, 4, 1, 1)]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", _fp8_gemv_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemv_matches_reference(m, config, dtype):
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels import fp8_linear_ref
    from ember.quant.kernels.fp8_gemv import fp8_gemv_triton
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(6))
    q, s = quantize_fp8(w, per_row=True)
    # Every E4M3 byte but the two NaNs, signs and subnormals included, in the first row.
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)
    q[0, :codes.numel()] = codes.view(torch.float8_e4m3fn)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    args = (q.to(DEVICE), s.reshape(-1).to(DEVICE))
    want = fp8_linear_ref(x.float(), *args)
    tol = 1e-4 if dtype == torch.float32 else 1e-2   # bf16: the output's rounding
    torch.testing.assert_close(fp8_gemv_triton(x, *args, config=config).float(), want,
                               rtol=tol, atol=tol * want.abs().max().item())


# ---- the tensor-core skinny kernels (skinny_dot.py) -------------------------------------------
# On a GPU they take bf16 inputs and multiply in bf16 (fp32 accumulation); under the
# interpreter the same program runs with fp32 parts.
def _skinny_x(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return x.to(torch.bfloat16) if DEVICE == "cuda" else x


def _skinny_tol() -> float:
    return 1e-2 if DEVICE == "cuda" else 1e-4


def _skinny_configs(kind: str) -> list[tuple]:
    from ember.quant.kernels.skinny_dot import FP8_CONFIGS, INT4_CONFIGS
    configs = INT4_CONFIGS if kind == "int4" else FP8_CONFIGS
    if DEVICE == "cuda":
        return list(configs)
    # The interpreter is slow: the last tile of each kind (INT4: epilogue, FOLD, FOLD with
    # PREFETCH).
    kinds = {tuple(c[4:]): c for c in configs}
    return list(kinds.values())


# m = 1 and 5 (one 16-row tile), 20 (32-row tile), 70 rows would exceed MAX_ROWS; N = 72
# is not a multiple of any BLOCK_N; K = 512 with 2 splits ends tiles on group borders.
@pytest.mark.parametrize("m", [1, 5, 20, 50])
@pytest.mark.parametrize("config", _skinny_configs("int4"))
def test_int4_skinny_matches_reference(m, config):
    from ember.quant.kernels.skinny_dot import int4_skinny
    qw, s, z = _int4_weight(72, 512, 128, seed=m)
    x = _skinny_x(m, 512, seed=m + 1)
    s = s.to(x.dtype)
    want = int4_linear_ref(x.float(), qw, s.float(), z)
    got = int4_skinny(x, qw, s, z, config=config).float()
    tol = _skinny_tol()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("config", _skinny_configs("fp8"))
def test_fp8_skinny_matches_reference(m, config):
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels import fp8_linear_ref
    from ember.quant.kernels.skinny_dot import fp8_skinny
    w = torch.randn(72, 512, generator=torch.Generator().manual_seed(8))
    q, s = quantize_fp8(w, per_row=True)
    # Every E4M3 byte but the two NaNs, signs and subnormals included, in the first row
    # (the bit-moving decode must place each of them).
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)
    q[0, :codes.numel()] = codes.view(torch.float8_e4m3fn)
    x = _skinny_x(m, 512, seed=9)
    args = (q.to(DEVICE), s.reshape(-1).to(DEVICE))
    want = fp8_linear_ref(x.float(), *args)
    got = fp8_skinny(x, *args, config=config).float()
    tol = _skinny_tol()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    # Row 0 alone (every code once) against its exact value: a misplaced bit shows here.
    exact = (x.double() @ (q[0].to(torch.float64) * s.reshape(-1)[0].double()).to(DEVICE))
    torch.testing.assert_close(got[:, 0].double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


def _nvfp4_weight_every_code(n: int, k: int, seed: int):
    """An NVFP4 weight [n, k] with every E2M1 code and -0, subnormal block scales among the
    normal ones and per-row global scales (packed, block scales, global scales, on DEVICE)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, bs, gs = quantize_nvfp4(w)
    packed[::5, 3] = (packed[::5, 3] & 0xF0) | 8          # -0, which quantization never gives
    assert len(torch.unique(torch.stack([packed & 0xF, packed >> 4], -1))) == 16
    bs[::7, ::3] = torch.tensor(0.001953125 * 5).to(torch.float8_e4m3fn)      # subnormal scales
    return packed.to(DEVICE), bs.to(DEVICE), (torch.linspace(0.5, 2.0, n) * gs).to(DEVICE)


def _nvfp4_skinny_configs() -> list[tuple]:
    from ember.quant.kernels.skinny_dot import NVFP4_CONFIGS
    if DEVICE == "cuda":
        return list(NVFP4_CONFIGS)
    kinds = {tuple(c[4:]): c for c in NVFP4_CONFIGS}    # one of each kind (with and without PREFETCH)
    return list(kinds.values())


# 9 and 20 rows (16- and 32-row tiles), 64 (the most); N = 72 no multiple of BLOCK_N; K = 384
# with split tiles that end inside the range.
@pytest.mark.parametrize("m", [9, 20, 64])
@pytest.mark.parametrize("config", _nvfp4_skinny_configs())
def test_nvfp4_skinny_matches_reference(m, config):
    from ember.quant.kernels.skinny_dot import nvfp4_skinny
    args = _nvfp4_weight_every_code(72, 384, seed=m + 40)
    x = _skinny_x(m, 384, seed=m + 41)
    want = nvfp4_linear_ref(x.float(), *args)
    got = nvfp4_skinny(x, *args, config=config).float()
    tol = _skinny_tol()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_nvfp4_dequant_kernel_matches_reference():
    # The large-batch path's NVFP4 dequantization: 256-column tiles (K = 512) and one block a
    # tile (K = 400); fp32 exact, bf16 one rounding (the interpreter's cast truncates).
    from ember.quant.kernels.w4a16 import nvfp4_dequant_triton
    from ember.quant.nvfp4_format import dequantize_nvfp4
    for k in (512, 400):
        packed, bs, gs = _nvfp4_weight_every_code(40, k, seed=k)
        want = dequantize_nvfp4(packed.cpu(), bs.cpu(), gs.cpu())
        torch.testing.assert_close(nvfp4_dequant_triton(packed, bs, gs, torch.float32).cpu(), want, rtol=0, atol=0)
        bf = nvfp4_dequant_triton(packed, bs, gs, torch.bfloat16).cpu()
        if DEVICE == "cuda":
            assert torch.equal(bf, want.to(torch.bfloat16))
        else:
            torch.testing.assert_close(bf.float(), want.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)


def test_skinny_kernels_refuse_too_many_rows():
    from ember.quant.kernels.skinny_dot import MAX_ROWS, int4_skinny
    qw, s, z = _int4_weight(16, 256, 128, seed=3)
    with pytest.raises(ValueError, match="at most"):
        int4_skinny(torch.zeros(MAX_ROWS + 1, 256, device=DEVICE), qw, s, z)


# ---- which kernel serves which batch size (the linear methods' dispatch) -----------------------
def _linear(method: str, k: int, params: dict | None = None):
    """A quantized Linear [64, k] (weights never read: only the dispatch is asked)."""
    from ember.layers.linear import Linear
    from ember.quant.base import QuantConfig, linear_method_for
    return Linear(k, 64, method=linear_method_for(QuantConfig(method, params=params or {})))


@pytest.mark.parametrize("rows,dtype,want", [
    (1, torch.bfloat16, "w4a16"), (8, torch.bfloat16, "w4a16"),   # tuned GEMVs, the MMA GEMV among them
    (9, torch.bfloat16, "skinny"), (64, torch.bfloat16, "skinny"),
    (65, torch.bfloat16, "dequant"),                              # dequantize once + the dense GEMM
    (20, torch.float32, "w4a16"),                                 # fp32 rows: the fused kernels
])
def test_nvfp4_dispatch(rows, dtype, want):
    lin = _linear("nvfp4", 256)
    assert lin.method._kernel(lin, torch.zeros(rows, 256, dtype=dtype)) == want
    cuda_cores = _linear("nvfp4", 256, {"small_batch_kernel": "gemv", "large_batch_kernel": "gemm"})
    assert cuda_cores.method._kernel(cuda_cores, torch.zeros(rows, 256, dtype=dtype)) == "w4a16"
    with pytest.raises(ValueError, match="large_batch_kernel"):
        bad = _linear("nvfp4", 256, {"large_batch_kernel": "cublas"})
        bad.method._kernel(bad, torch.zeros(rows, 256, dtype=dtype))


def test_nvfp4_small_batch_kernel_param():
    assert _linear("nvfp4", 256).method._small_batch_kernel() == "mma"
    assert _linear("nvfp4", 256, {"small_batch_kernel": "gemv"}).method._small_batch_kernel() == "gemv"
    with pytest.raises(ValueError, match="small_batch_kernel"):
        _linear("nvfp4", 256, {"small_batch_kernel": "skinny"}).method._small_batch_kernel()


@pytest.mark.parametrize("rows,dtype,want", [
    (1, torch.bfloat16, False),     # one row: the decoder / MMA GEMV (tuned)
    (2, torch.bfloat16, False), (8, torch.bfloat16, False),   # the MMA GEMV (kernels/int4_mma.py)
    (9, torch.bfloat16, True), (64, torch.bfloat16, True),
    (65, torch.bfloat16, False),    # the GEMM
    (8, torch.float32, False),      # the skinny kernels multiply in bf16
])
def test_awq_small_batch_dispatch(rows, dtype, want):
    lin = _linear("awq", 256)
    assert lin.method._skinny(lin, torch.zeros(rows, 256, dtype=dtype)) is want
    gemv_only = _linear("awq", 256, {"small_batch_kernel": "gemv"})
    assert gemv_only.method._skinny(gemv_only, torch.zeros(rows, 256, dtype=dtype)) is False
    skinny = _linear("awq", 256, {"small_batch_kernel": "skinny"})   # the default before the MMA GEMV
    assert skinny.method._skinny(skinny, torch.zeros(rows, 256, dtype=dtype)) is (
        dtype == torch.bfloat16 and 2 <= rows <= 64)
    # Above 64 rows: dequantize once + the dense GEMM, unless the fused GEMM is asked for.
    assert lin.method._dequant_gemm(torch.zeros(rows, 256, dtype=dtype)) is (rows > 64)
    fused = _linear("awq", 256, {"large_batch_kernel": "gemm"})
    assert fused.method._dequant_gemm(torch.zeros(rows, 256, dtype=dtype)) is False


@pytest.mark.parametrize("rows,dtype,want", [
    (1, torch.bfloat16, "gemv"), (2, torch.bfloat16, "skinny"), (64, torch.bfloat16, "skinny"),
    (65, torch.bfloat16, None), (4, torch.float16, "gemv"), (9, torch.float16, None),
])
def test_fp8_small_batch_dispatch(rows, dtype, want):
    lin = _linear("fp8", 256)
    assert lin.method._small_batch_kernel(lin, torch.zeros(rows, 256, dtype=dtype)) == want
    w8a8 = _linear("fp8", 256, {"decode_kernel": "scaled_mm"})
    assert w8a8.method._small_batch_kernel(w8a8, torch.zeros(rows, 256, dtype=dtype)) is None


@pytest.mark.parametrize("kernel", ["int4_gemv", "fp8_gemv", "int4_skinny"])
def test_split_k_partials_summed_in_kernel_equal_the_reduce_kernel(monkeypatch, kernel):
    # With FIXUP each output tile's last split sums the partials (in split order) and
    # re-zeroes its counter; without, sum_splits runs after the kernel. Same numbers, and
    # the in-kernel path launches no reduce kernel. (The skinny kernels keep the reduce
    # kernel by default, FIXUP_SKINNY; the in-kernel path is tested here all the same.)
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels import skinny_dot, splitk
    from ember.quant.kernels.fp8_gemv import fp8_gemv_triton
    from ember.quant.kernels.skinny_dot import int4_skinny
    qw, s, z = _int4_weight(72, 512, 128, seed=5)
    q8, s8 = quantize_fp8(torch.randn(72, 512, generator=torch.Generator().manual_seed(6)), per_row=True)
    x = _skinny_x(2, 512, seed=7)
    run = {"int4_gemv": lambda: int4_linear_triton(x[:1], qw, s.to(x.dtype), z, config=(16, 128, 4, 4)),
           "fp8_gemv": lambda: fp8_gemv_triton(x[:1], q8.to(DEVICE), s8.reshape(-1).to(DEVICE),
                                               config=(16, 64, 4, 2)),
           "int4_skinny": lambda: int4_skinny(x, qw, s.to(x.dtype), z, config=(16, 128, 4, 1))}[kernel]
    monkeypatch.setattr(skinny_dot, "FIXUP_SKINNY", True)
    reduces = []
    sum_splits = splitk.sum_splits
    monkeypatch.setattr(splitk, "sum_splits", lambda p, y: (reduces.append(1), sum_splits(p, y)))
    results = {}
    for fixup in (False, True):
        monkeypatch.setattr(splitk, "FIXUP", fixup)
        reduces.clear()
        results[fixup] = run()
        assert len(reduces) == (0 if fixup else 1)
    assert torch.equal(results[True], results[False])
    assert not splitk._COUNTERS[results[True].device].any(), "a tile counter was left non-zero"


@pytest.mark.parametrize("n,k,group", [(40, 512, 128), (72, 192, 96), (24, 512, 64), (16, 384, 128)])
def test_int4_dequant_kernel_matches_reference(n, k, group):
    # The large-batch path's dequantization: 256-column tiles of whole groups (128, 64),
    # tiles inside a group (96; K = 384 is no multiple of 256); N not a multiple of the
    # tile. (code - zero) * scale has one rounding, to the output dtype: exact on the GPU;
    # the interpreter's fp32 -> bf16 cast truncates (at most one bf16 ulp off).
    from ember.quant.int4 import dequantize_int4
    from ember.quant.kernels.w4a16 import int4_dequant_triton
    qw, s, z = _int4_weight(n, k, group, seed=n)
    want = dequantize_int4(qw.cpu(), s.cpu(), z.cpu())
    torch.testing.assert_close(int4_dequant_triton(qw, s, z, torch.float32).cpu(), want, rtol=0, atol=0)
    s16 = s.to(torch.bfloat16)
    bf = int4_dequant_triton(qw, s16, z, torch.bfloat16).cpu()
    assert bf.dtype == torch.bfloat16
    want16 = dequantize_int4(qw.cpu(), s16.cpu(), z.cpu()).to(torch.bfloat16)
    if DEVICE == "cuda":
        assert torch.equal(bf, want16)
    else:
        torch.testing.assert_close(bf.float(), want16.float(), rtol=2 ** -7, atol=0)


def _run_ptx(asm: str, inputs: dict[int, int]) -> tuple[dict[str, int], list[int]]:
    """Run a decoder's inline PTX on 32-bit integers: the integer instructions it uses
    (and / shr / shl / prmt / lop3) exactly, the bf16x2 and fp32 arithmetic not (its results
    are None); returns the registers and, for each bf16x2 mul / fma, the value of its first
    operand (the decoded weight pair)."""
    regs: dict[str, int | None] = {f"${i}": v for i, v in inputs.items()}
    pairs = []

    def val(tok: str) -> int | None:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.replace("{", "\n").replace("}", "\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        if op in ("mul.rn.bf16x2", "fma.rn.bf16x2"):
            pairs.append(val(a[1]))
            regs[a[0]] = None          # the bf16x2 accumulator: not emulated
            continue
        x = [val(t) for t in a[1:]]
        if op == "add.f32" or None in x:   # the accumulator's widening to fp32
            regs[a[0]] = None
            continue
        if op == "mov.b32":
            r = x[0]
        elif op == "and.b32":
            r = x[0] & x[1]
        elif op == "shr.u32":
            r = x[0] >> x[1]
        elif op == "shl.b32":
            r = (x[0] << x[1]) & 0xFFFFFFFF
        elif op == "prmt.b32":
            by = [(x[0] >> 8 * i) & 0xFF for i in range(4)] + [(x[1] >> 8 * i) & 0xFF for i in range(4)]
            r = 0
            for i in range(4):
                sel = (x[2] >> 4 * i) & 0xF
                b = by[sel & 7]
                r |= ((0xFF if b & 0x80 else 0) if sel & 8 else b) << 8 * i
        elif op == "lop3.b32":
            r = 0
            for bit in range(32):
                i = ((x[0] >> bit & 1) << 2) | ((x[1] >> bit & 1) << 1) | (x[2] >> bit & 1)
                r |= (x[3] >> i & 1) << bit
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[a[0]] = r
    return regs, pairs


@pytest.mark.parametrize("form", ["word_dot", "mma", "parts"])
def test_nvfp4_asm_decodes_every_code_exactly(form):
    # The compiled NVFP4 decoders run only on a GPU; here their integer part runs on an
    # emulator, bit for bit, for every code in every position: the bf16 pairs fed to the
    # multiplies of the GEMV's word dot (decode._NVFP4_WORD_DOT_ASM) and of the MMA GEMV's
    # block-scale product (int4_mma._nvfp4_pairs) must be the E2M1 values of codes 2i,
    # 2i + 1; the fp32 parts of the skinny / dequantizing tiles (decode._NVFP4_F32_ASM,
    # whose bf16 twin differs only in its last moves) their values.
    import struct
    from ember.quant.kernels import decode, int4_mma
    table = [int(v) & 0xFFFFFFFF for v in (decode.E2M1_LO_0, decode.E2M1_LO_4, decode.E2M1_HI_0, decode.E2M1_HI_4)]
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

    def bf16_bits(v: float) -> int:
        return struct.unpack("<I", struct.pack("<f", v))[0] >> 16

    gen = torch.Generator().manual_seed(0)
    words = [int(w) & 0xFFFFFFFF for w in torch.randint(-2 ** 31, 2 ** 31 - 1, (300,), generator=gen)]
    words += [sum(c << 4 * j for j in range(8)) for c in range(16)]          # each code everywhere
    for q in words:
        codes = [(q >> 4 * j) & 0xF for j in range(8)]
        want = [bf16_bits(-mags[c & 7] if c & 8 else mags[c & 7]) for c in codes]
        if form == "word_dot":
            _, pairs = _run_ptx(decode._NVFP4_WORD_DOT_ASM.value, {1: q, 2: 0, 3: 0, 4: 0, 5: 0,
                                                                   6: table[0], 7: table[1], 8: table[2], 9: table[3]})
        elif form == "mma":
            _, pairs = _run_ptx(int4_mma._nvfp4_pairs("$4", "g", "$6"),
                                {4: q, 6: 0, 16: table[0], 17: table[1], 18: table[2], 19: table[3]})
        else:
            regs, _ = _run_ptx(decode._NVFP4_F32_ASM.value, {8: q})
            assert all(regs[f"${j}"] & 0xFFFF == 0 for j in range(8))
            pairs = [(regs[f"${2 * i}"] >> 16) | regs[f"${2 * i + 1}"] for i in range(4)]
        got = [h for p in pairs for h in (p & 0xFFFF, p >> 16)]
        assert got == want, hex(q)


def test_fp8_word_dot_asm_decodes_every_byte_exactly():
    # The compiled packed FP8 GEMV decoder (decode._FP8_WORD_DOT2_ASM) runs only on a GPU;
    # its integer part runs here on the emulator: the bf16 pairs fed to the four multiplies
    # must be each word's bytes (0, 2) then (1, 3), as E4M3 value times 2^-120, bit for bit
    # (subnormals and signs included), the pairing fp8_x_quad gives x.
    import struct
    from ember.quant.kernels import decode

    def bits(byte: int) -> int:
        v = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).double().item()
        return struct.unpack("<I", struct.pack("<f", v * 2.0 ** -120))[0] >> 16

    codes = [b for b in range(256) if b & 0x7F != 0x7F]          # every byte but the NaNs
    words = [sum(codes[(4 * i + j) % len(codes)] << 8 * j for j in range(4)) for i in range(len(codes))]
    for qa, qb in zip(words, words[1:] + words[:1]):
        _, pairs = _run_ptx(decode._FP8_WORD_DOT2_ASM.value, {1: qa, 2: qb, 3: 0, 4: 0, 5: 0, 6: 0})
        want = []
        for q in (qa, qb):
            by = [(q >> 8 * j) & 0xFF for j in range(4)]
            want += [bits(by[0]), bits(by[2]), bits(by[1]), bits(by[3])]
        got = [h for p in pairs for h in (p & 0xFFFF, p >> 16)]
        assert got == want, (hex(qa), hex(qb))


def test_tuner_retimes_its_finalists(monkeypatch):
    # Round one ranks every tile by one sample (noise only slows a replay); the three
    # fastest are timed again in turn and the best of all their samples decides: tile "c"
    # ranked second behind "b" in round one, slowed by noise, and is the fastest after;
    # "e" cannot run (infinite).
    from types import SimpleNamespace
    from ember.quant.kernels import splitk
    first = {"a": 5.0, "b": 3.2, "c": 3.4, "d": 3.6, "e": float("inf")}
    later = {"b": [3.3, 3.2, 3.4, 3.3], "c": [3.1, 3.0, 3.2, 3.1], "d": [3.5, 3.5, 3.5, 3.5]}
    ran = []
    monkeypatch.setattr(splitk, "_time_or_inf", lambda fn: fn())
    monkeypatch.setattr(splitk, "_time_ms", lambda fn: later[fn()].pop(0))
    monkeypatch.setattr(splitk, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(splitk, "AUTOTUNE", True)

    def run(c):
        ran.append(c)
        return first[c] if ran.count(c) == 1 else c

    assert splitk.choose_config(("k",), list(first), run, SimpleNamespace(is_cuda=True)) == "c"
    assert ran.count("a") == 1 and ran.count("e") == 1            # not finalists
    assert all(not v for v in later.values())                     # each finalist re-timed 4 times
    assert splitk.choose_config(("k",), list(first), run, SimpleNamespace(is_cuda=True)) == "c"   # cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_row_quantization_matches_torch_bit_for_bit(dtype):
    # The one-launch per-token FP8 quantization (W8A8 prefill) against quantize_fp8: the
    # same scales and the same E4M3 codes, over rows spanning 2^-20..2^8 in magnitude (so
    # every row has subnormal codes), rows longer than one block, a zero row and -0.
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels.fp8_quant import quantize_fp8_rows
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5000, generator=g) * torch.exp2(torch.randint(-20, 9, (6, 5000), generator=g).float())
    x[2] = 0.0
    # Row 3's scale is 1: exact E4M3 ties (1.0625, 3.25 -> even; 3 * 2^-10 between subnormal
    # codes 1 and 2 -> 2), the largest subnormal step and 2^-6 from below.
    x[3] = torch.linspace(-400, 400, 5000)
    x[3, :9] = torch.tensor([-0.0, 448.0, -3.25, 2.0 ** -10, 3 * 2.0 ** -10, 1.125, 1.0625,
                             7.5 * 2.0 ** -9, 0.0155])
    x = x.to(dtype).to(DEVICE)
    want_q, want_s = quantize_fp8(x, per_row=True)
    got_q, got_s = quantize_fp8_rows(x)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
