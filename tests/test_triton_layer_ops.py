"""The fused Triton layer ops (RMSNorm + residual, RoPE + q/k norm, SiLU-and-mul) against
their torch references (`TorchLayerOps`), at small ragged shapes: on the CPU through
Triton's interpreter, on a GPU compiled."""
from __future__ import annotations

import pytest
import torch

from _triton_interpret import DEVICE

from ember.layers.layer_ops import TORCH_LAYER_OPS, get_layer_ops  # noqa: E402
from ember.layers.rotary import compute_inv_freq  # noqa: E402
from ember.layers.triton_gemv import GemvConfig, choose_config, gemv  # noqa: E402
from ember.layers.triton_layer_ops import TritonLayerOps  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

TRITON = TritonLayerOps()
# fp32: the kernels keep fp32 throughout, differing from torch only in fused multiply-adds.
# bf16: they round where torch rounds, so compiled they stay within one bf16 step (2^-7
# relative) of torch. Triton 3.6's interpreter truncates fp32 -> bf16 instead of rounding
# to nearest (measured: half of random values differ from torch's cast), which compounds
# over two roundings, so on the CPU the bound is three steps.
BF16_TOL = 8e-3 if DEVICE == "cuda" else 2.4e-2
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=BF16_TOL, atol=BF16_TOL)}
EXACT_CASTS = DEVICE == "cuda"
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 64), (5, 100)])
def test_rms_norm(dtype, rows, d):
    x = randn(rows, d, dtype=dtype, seed=0) * 3
    w = randn(d, dtype=dtype, seed=1)
    ref = TORCH_LAYER_OPS.rms_norm(x, w, 1e-6)
    out = TRITON.rms_norm(x.clone(), w, 1e-6)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_returns_sum_and_norm_in_place(dtype):
    x = randn(7, 96, dtype=dtype, seed=2)
    res = randn(7, 96, dtype=dtype, seed=3)
    w = randn(96, dtype=dtype, seed=4)
    ref_norm, ref_sum = TORCH_LAYER_OPS.add_rms_norm(x, res, w, 1e-5)
    x2, res2 = x.clone(), res.clone()
    out_norm, out_sum = TRITON.add_rms_norm(x2, res2, w, 1e-5)
    # The sum is rounded to the activation dtype exactly as torch rounds it.
    exact = dtype == torch.float32 or EXACT_CASTS
    torch.testing.assert_close(out_sum, ref_sum, **(dict(rtol=0, atol=0) if exact else TOL[dtype]))
    torch.testing.assert_close(out_norm, ref_norm, **TOL[dtype])
    assert out_norm.data_ptr() == x2.data_ptr() and out_sum.data_ptr() == res2.data_ptr()


def _rope_tables(d: int, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = compute_inv_freq(d, 10000.0, None)
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 16), (8, 2, 32), (6, 1, 24)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_matches_reference(dtype, heads, kv_heads, d, qk_norm):
    t = 5
    cos, sin = _rope_tables(d, 64)
    positions = torch.tensor([0, 3, 17, 63, 9], device=DEVICE)
    # q and k as views into one qkv buffer, the way the attention layer passes them.
    qkv = randn(t, (heads + 2 * kv_heads) * d, dtype=dtype, seed=5)
    q = qkv[:, :heads * d].view(t, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d)
    qw = randn(d, dtype=dtype, seed=6) if qk_norm else None
    kw = randn(d, dtype=dtype, seed=7) if qk_norm else None
    ref_q, ref_k = TORCH_LAYER_OPS.rope(TORCH_LAYER_OPS.rope_step(cos, sin, positions), q, k, qw, kw)
    v_before = qkv[:, (heads + kv_heads) * d:].clone()
    out_q, out_k = TRITON.rope(TRITON.rope_step(cos, sin, positions), q, k, qw, kw)
    torch.testing.assert_close(out_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(out_k, ref_k, **TOL[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], v_before), "v was touched"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 40), (3, 1500)])
def test_silu_and_mul(dtype, rows, d):
    x = randn(rows, 2 * d, dtype=dtype, seed=8) * 2
    torch.testing.assert_close(TRITON.silu_and_mul(x), TORCH_LAYER_OPS.silu_and_mul(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias,config", [
    (24, 64, False, GemvConfig(8, 32, 4)),      # K a multiple of the tile
    (13, 100, True, GemvConfig(4, 32, 2)),      # ragged N and K, with bias
    (40, 96, False, GemvConfig(16, 64, 4)),
])
def test_gemv_matches_linear(dtype, n, k, bias, config):
    w = randn(n, k, dtype=dtype, seed=9)
    x = randn(1, k, dtype=dtype, seed=10)
    b = randn(n, dtype=dtype, seed=11) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    out = gemv(x, w, b, config)
    assert out.shape == (1, n) and out.dtype == dtype
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err


def test_gemv_config_by_shape():
    # The tiles the H200 sweep chose for Llama-3.1-8B's four projections and its LM head.
    assert choose_config(28672, 4096) == GemvConfig(16, 256, 4)
    assert choose_config(128256, 4096) == GemvConfig(16, 256, 4)
    assert choose_config(4096, 14336) == GemvConfig(4, 1024, 2)
    assert choose_config(4096, 4096) == GemvConfig(8, 512, 8)
    assert choose_config(6144, 4096) == GemvConfig(4, 1024, 2)


def test_registry():
    assert get_layer_ops("auto", torch.device("cpu")).name == "torch"
    assert get_layer_ops("triton", torch.device("cpu")).name == "triton"
    with pytest.raises(ValueError, match="unknown layer kernels"):
        get_layer_ops("fast", torch.device("cpu"))


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch needs a CUDA GPU")
def test_pdl_chain_in_a_graph_matches_plain_launches(monkeypatch):
    """Norms that let their dependents start early, GEMVs that start early and wait for
    them (ember.layers.pdl), captured in a CUDA graph and replayed on new inputs: the same
    bits as with ordinary launches, so no GEMV read its input before it was written."""
    from ember.layers.pdl import pdl_enabled
    d, f = 4096, 8192
    w1, w2 = randn(f, d, dtype=torch.bfloat16, seed=20), randn(d, f, dtype=torch.bfloat16, seed=21)
    nw1, nw2 = randn(d, dtype=torch.bfloat16, seed=22), randn(f, dtype=torch.bfloat16, seed=23)

    def chain(x, res):
        h, res = TRITON.add_rms_norm(x, res, nw1, 1e-5)
        y = gemv(h, w1)
        return gemv(TRITON.rms_norm(y, nw2, 1e-5), w2), res

    def run_all(inputs):
        outs = []
        x_s, r_s = inputs[0][0].clone(), inputs[0][1].clone()
        chain(x_s, r_s)   # compile
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out_s, _ = chain(x_s, r_s)
        for x, r in inputs:
            x_s.copy_(x)
            r_s.copy_(r)
            g.replay()
            outs.append(out_s.clone())
        return outs
    inputs = [(randn(1, d, dtype=torch.bfloat16, seed=30 + i), randn(1, d, dtype=torch.bfloat16, seed=40 + i))
              for i in range(4)]
    assert pdl_enabled(inputs[0][0]) == (torch.cuda.get_device_capability()[0] >= 9)
    with_pdl = run_all(inputs)
    monkeypatch.setenv("EMBER_PDL", "0")
    assert not pdl_enabled(inputs[0][0])
    plain = run_all(inputs)
    for a, b in zip(with_pdl, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,v", [(1, 5000), (3, 8192), (2, 4100)])
def test_argmax_rows_matches_torch_with_ties(dtype, rows, v):
    from ember.layers.triton_argmax import argmax_rows
    x = randn(rows, v, dtype=dtype, seed=50)
    # Plant ties: each row's max twice (and in different chunks), so the first must win.
    x[:, 3000] = 9.0
    x[:, 4097] = 9.0
    if rows > 1:
        x[1, 17] = 9.0           # the tie's first index in chunk 0
        x[-1, v - 1] = 11.0      # a unique max in the last, partial chunk
    got = argmax_rows(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1))


def test_eagle_layer_leaves_its_inputs_alone_with_in_place_layer_ops():
    # TritonLayerOps.add_rms_norm writes the residual sum in place. EAGLE's layer must not
    # hand it the caller's hidden states: P-EAGLE feeds mask_hidden.expand(n, -1), so an
    # in-place sum would overwrite the learned parameter on every draft (on the GPU only).
    from ember.config import ModelConfig
    from ember.spec.eagle import EagleLayer
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                 "num_key_value_heads": 2})
    torch.manual_seed(0)
    layers = {name: EagleLayer(cfg, None, ops, False).to(DEVICE)
              for name, ops in (("torch", TORCH_LAYER_OPS), ("triton", TritonLayerOps()))}
    for p in layers["torch"].parameters():
        p.data.normal_(0, 0.1)
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    mask_hidden = torch.randn(32, device=DEVICE)
    embeds = torch.randn(3, 32, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    inv = compute_inv_freq(8, 10000.0, None)
    ang = torch.outer(torch.arange(16, dtype=torch.float32), inv).to(DEVICE)
    rope = TORCH_LAYER_OPS.rope_step(ang.cos(), ang.sin(), pos)

    def attend(q, k, v):   # dense causal attention over the 3 rows, kv heads repeated
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                             v.transpose(0, 1), is_causal=True)
        return o.transpose(0, 1)

    before = mask_hidden.clone()
    outs = {name: layer(rope, embeds, mask_hidden.expand(3, -1), attend) for name, layer in layers.items()}
    assert torch.equal(mask_hidden, before), "the layer wrote into its hidden-state input"
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-4)
