"""Quantization end to end on tiny Llama checkpoints: the registry and checkpoint detection,
quantize-on-load, AWQ vs RTN with planted activation outliers, `ember quantize` checkpoints
that load back, AutoAWQ / ModelOpt / compressed-tensors layouts, and sliding-window perplexity."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import pytest
import torch

from conftest import random_prompts
from ember import LLM
from ember.eval.forward import sequence_logits
from ember.eval.ppl import perplexity
from ember.quant.base import QuantConfig, detect_quant_config, resolve_quant_config
from ember.quant.calibrate import collect_input_stats
from ember.quant.checkpoint import save_quantized
from ember.quant.cli import quantize_llm
from ember.quant.int4 import awq_pack_cols, dequantize_int4, pack_int4, quantize_int4
from ember.quant.nvfp4_format import dequantize_nvfp4, quantize_nvfp4

GROUP = 32  # the tiny models' in_features are 64 and 128


def load(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", num_kv_blocks=64, block_size=8, prefix_cache="none", **kw)


def logits_of(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    return torch.cat([sequence_logits(llm, p) for p in prompts])


@pytest.fixture(scope="module")
def fp(tiny_llama):
    llm = load(tiny_llama.path)
    prompts = random_prompts([40, 33], seed=5)
    return llm, prompts, logits_of(llm, prompts)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- registry and detection -----------------------------------------------------------------
def test_detect_quant_config_from_checkpoints():
    assert detect_quant_config({}) is None
    awq = detect_quant_config({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64,
                                                       "zero_point": True, "version": "gemm"}})
    assert (awq.method, awq.group_size, awq.checkpoint_format, awq.prequantized) == ("awq", 64, "autoawq", True)
    mo = detect_quant_config({"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}})
    assert (mo.method, mo.checkpoint_format) == ("nvfp4", "modelopt")
    ct = detect_quant_config({"quantization_config": {"quant_method": "compressed-tensors",
                                                      "format": "nvfp4-pack-quantized"}})
    assert (ct.method, ct.checkpoint_format) == ("nvfp4", "compressed-tensors")
    own = QuantConfig("smoothquant", params={"alpha": 0.5})
    back = detect_quant_config({"quantization_config": own.to_dict()})
    assert (back.method, back.params, back.prequantized) == ("smoothquant", {"alpha": 0.5}, True)
    with pytest.raises(ValueError):
        detect_quant_config({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError):  # a quantized checkpoint cannot be re-quantized another way
        resolve_quant_config("fp8", {"quantization_config": own.to_dict()})
    with pytest.raises(ValueError):
        QuantConfig("int3")
    assert resolve_quant_config("none", {}).method == "none"


# ---- quantize-on-load -----------------------------------------------------------------------
# method -> bound on the relative error of the logits vs full precision
ON_LOAD = {"awq": 0.4, "nvfp4": 0.4, "fp8": 0.12, "smoothquant": 0.05}


@pytest.mark.parametrize("method", sorted(ON_LOAD))
def test_quantize_on_load_stays_close(tiny_llama, fp, method):
    _, prompts, ref = fp
    llm = load(tiny_llama.path, quantization=method)
    lin = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert not hasattr(lin, "weight") or lin.weight.dtype != torch.float32  # really quantized
    err = rel_err(logits_of(llm, prompts), ref)
    assert 0 < err < ON_LOAD[method]


@pytest.mark.parametrize("method", ["awq", "nvfp4", "fp8"])
def test_apply_matches_its_dequantized_weight(tiny_llama, method):
    # Weight-only paths on the CPU compute exactly x @ dequantize(W)^T.
    llm = load(tiny_llama.path, quantization=method)
    lin = llm.engine.runner.model.model.layers[1].mlp.down_proj
    w = lin.method.dequantize(lin)
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0)).to(w.device)
    tol = 1e-5 if w.device.type == "cpu" else 1e-3     # the GPU kernels' own summation order
    torch.testing.assert_close(lin(x), x @ w.t(), rtol=tol, atol=tol)


def test_dummy_weights_with_quantization(tiny_llama):
    llm = LLM(os.path.join(tiny_llama.path, "config.json"), load_format="dummy", dtype="float32",
              num_kv_blocks=32, block_size=8, quantization="awq")
    out = llm.generate({"prompt_token_ids": [1, 5, 9]}, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


# ---- AWQ vs RTN -----------------------------------------------------------------------------
OUTLIERS = [3, 17, 40]


@torch.no_grad()
def plant_outliers(llm: LLM, factor: float = 30.0) -> None:
    """Make a few input channels of qkv and gate_up large (norm weight x factor) while the
    weight columns that read them shrink by the same factor: the function is unchanged,
    but those channels' weights become small next to the rest of their group."""
    for layer in llm.engine.runner.model.model.layers:
        for norm, lin in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                          (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
            norm.weight.data[OUTLIERS] *= factor
            lin.weight.data[:, OUTLIERS] /= factor


def _outlier_errors(tiny_llama, awq: Callable[[LLM, list[list[int]]], None]) -> tuple[float, float]:
    """Held-out logits' relative error of RTN and of `awq(llm, calib)` (which quantizes)
    on the tiny model with planted activation outliers."""
    calib = random_prompts([64] * 8, seed=11)
    held_out = random_prompts([48, 48], seed=12)

    def quantized_error(quantize: Callable[[LLM], None]) -> float:
        llm = load(tiny_llama.path)
        plant_outliers(llm)
        ref = logits_of(llm, held_out)
        quantize(llm)
        return rel_err(logits_of(llm, held_out), ref)

    return (quantized_error(lambda llm: quantize_llm(llm, "rtn", [], group_size=GROUP)),
            quantized_error(lambda llm: awq(llm, calib)))


@pytest.mark.parametrize("options", [{}, {"clip": False}, {"loss": "block"}, {"duo": True}],
                         ids=["default", "no-clip", "block-loss", "duo"])
def test_awq_beats_rtn_with_planted_outliers(tiny_llama, options):
    def awq(llm, calib):
        stats = collect_input_stats(llm, calib, rows_per_seq=16, full_seqs=8)
        quantize_llm(llm, "awq", [], group_size=GROUP, stats=stats, awq_options=options)

    rtn, awq_err = _outlier_errors(tiny_llama, awq)
    assert awq_err < 0.5 * rtn, (awq_err, rtn)


def test_awq_sequential_beats_rtn_with_planted_outliers(tiny_llama):
    # Layer-by-layer calibration on the quantized layers' outputs, every token in the losses.
    from ember.quant.awq_sequential import apply_awq_sequential

    def awq(llm, calib):
        apply_awq_sequential(llm.engine.runner.model, calib, GROUP, rows_per_seq=16)
        quantize_llm(llm, "rtn", [], group_size=GROUP)   # INT4 of the (folded, clipped) weights

    rtn, awq_err = _outlier_errors(tiny_llama, awq)
    assert awq_err < 0.5 * rtn, (awq_err, rtn)


@torch.no_grad()
def test_awq_layerwise_stats_match_the_engine(tiny_llama):
    # apply_awq_sequential runs the decoder layers outside the engine: on full-precision
    # layers its statistics must be the engine's own (hooks on the real forward).
    from ember.quant.awq_sequential import SUFFIXES, layer_forward, layer_stats
    llm = load(tiny_llama.path)
    model = llm.engine.runner.model
    prompts = random_prompts([37, 20], seed=7)
    want = collect_input_stats(llm, prompts, rows_per_seq=8, gram=True)
    dev = model.model.embed_tokens.weight.device
    streams = [model.model.embed_tokens(torch.tensor(p, device=dev)).float() for p in prompts]
    gen = torch.Generator().manual_seed(0)
    picks = [torch.randperm(len(p), generator=gen)[:8] for p in prompts]
    for i, layer in enumerate(model.model.layers):
        got = layer_stats(model, layer, f"model.layers.{i}", streams, picks, 0, gram=True)
        for suffix in SUFFIXES:
            name = f"model.layers.{i}.{suffix}"
            assert got[name].count == want[name].count == 57
            torch.testing.assert_close(got[name].mean_abs, want[name].mean_abs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[name].second_moment(), want[name].second_moment(),
                                       rtol=1e-4, atol=1e-5)
        streams = [layer_forward(model, layer, s) for s in streams]


def test_awq_gram_loss_matches_the_rows_loss():
    # The linear loss and the clipping search work on E[x x^T]: over every token (Gram
    # matrix) they must give the same numbers as the rows themselves.
    from ember.quant.awq_calibrate import linear_loss, quantized_at
    from ember.quant.calibrate import InputStats
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 64, generator=gen), torch.randn(300, 64, generator=gen) * torch.rand(64, generator=gen)
    st = InputStats.empty(64)
    st.observe(x, torch.arange(300), gram=True)
    s = torch.rand(64, generator=gen) + 0.5
    direct = (x @ quantized_at(w, s, GROUP).t() - x @ w.t()).pow(2).mean().item()
    assert math.isclose(linear_loss(w, st.second_moment(), GROUP)(s), direct, rel_tol=1e-4)
    st.gram = None   # the sampled rows (all 300 here) give the same moment
    assert math.isclose(linear_loss(w, st.second_moment(), GROUP)(s), direct, rel_tol=1e-4)


@torch.no_grad()
def test_awq_block_forwards_match_the_engine(tiny_llama):
    # The block-output loss recomputes the attention and MLP outside the engine: they must be
    # the engine's own forward (causal GQA attention with RoPE, o_proj; silu-gated MLP).
    from ember.quant.awq_calibrate import attention_rows, mlp_rows
    llm = load(tiny_llama.path)
    model = llm.engine.runner.model
    layer = model.model.layers[1]
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out.clone())),
             layer.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out.clone())),
             layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0].clone()))]
    stats = collect_input_stats(llm, random_prompts([37], seed=7), full_seqs=1)
    for h in hooks:
        h.remove()
    x = stats["model.layers.1.self_attn.qkv_proj"].seqs[0]                  # [37, hidden]
    dev = layer.self_attn.qkv_proj.weight.device
    x, rows = x.to(dev), torch.tensor([0, 5, 36], device=dev)
    rope = model.model.rotary.lookup(torch.arange(x.shape[0], device=dev))
    got = attention_rows(layer, rope, x, layer.self_attn.qkv_proj.weight, rows)
    torch.testing.assert_close(got, seen["attn"][rows], rtol=1e-4, atol=1e-5)
    got = mlp_rows(layer, seen["mlp_in"], layer.mlp.gate_up_proj.weight)
    torch.testing.assert_close(got, seen["mlp"], rtol=1e-4, atol=1e-5)


def test_awq_block_loss_search_beats_identity_on_the_block_output(tiny_llama):
    # Planted outliers: the search on the calibration prompts must pick scales whose block
    # output (attention output with qkv quantized; MLP output with gate_up quantized) on
    # held-out prompts is much closer to full precision than plain RTN's (scale 1).
    from ember.quant.awq_calibrate import attention_loss, mlp_loss, search_scale
    llm = load(tiny_llama.path)
    plant_outliers(llm)
    model = llm.engine.runner.model
    calib = collect_input_stats(llm, random_prompts([64] * 8, seed=11), rows_per_seq=16, full_seqs=8)
    held = collect_input_stats(llm, random_prompts([48] * 4, seed=12), rows_per_seq=48, full_seqs=4)
    for i, layer in enumerate(model.model.layers):
        qkv, gu = f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.mlp.gate_up_proj"
        for make, name in ((lambda st, L=layer: attention_loss(model, L, st.seqs, GROUP), qkv),
                           (lambda st, L=layer: mlp_loss(L, st.sample, GROUP), gu)):
            s, alpha, loss, rtn = search_scale(make(calib[name]), calib[name].mean_abs)
            assert alpha is not None and loss < rtn
            held_loss = make(held[name])
            assert held_loss(s) < 0.5 * held_loss(torch.ones_like(s)), name


def test_awq_clip_search_lowers_the_output_error():
    # One large weight per row in the first group, read by a small input channel: RTN spends
    # its levels on it; clipping it costs little output error and refines the rest.
    from ember.quant.awq_calibrate import search_clip
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    w[:, 5] = 8.0
    x = torch.randn(512, 64, generator=gen)
    x[:, 5] *= 0.02
    held = torch.randn(512, 64, generator=gen)
    held[:, 5] *= 0.02
    wc = search_clip(w, x.t() @ x / x.shape[0], GROUP)

    def delta(src: torch.Tensor) -> torch.Tensor:   # w minus src as the checkpoint quantizes it
        q, s, z = quantize_int4(src, GROUP)
        return w - dequantize_int4(pack_int4(q), s, z)

    def group_err(src: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:   # [out, groups]
        d = delta(src).reshape(16, 2, GROUP)
        return torch.einsum("nkg,okg->nok", inp.reshape(-1, 2, GROUP), d).pow(2).mean(0)

    assert (wc[:, 5] < 8.0).all() and (wc[:, 5] >= 0.55 * 8.0 - 1e-5).all()   # clipped, within the grid
    assert (group_err(wc, x) <= group_err(w, x) * (1 + 1e-5)).all()   # never worse per (row, group)
    # On held-out inputs, the first groups' output error drops well below RTN's.
    clipped, rtn = group_err(wc, held)[:, 0].sum(), group_err(w, held)[:, 0].sum()
    assert clipped < 0.5 * rtn, (clipped, rtn)


def test_smoothquant_folding_preserves_the_function(tiny_llama, fp):
    from ember.quant.smoothquant_calibrate import apply_smoothquant
    _, prompts, ref = fp
    llm = load(tiny_llama.path)
    stats = collect_input_stats(llm, random_prompts([32] * 2, seed=3))
    apply_smoothquant(llm.engine.runner.model, stats, alpha=0.5)
    torch.testing.assert_close(logits_of(llm, prompts), ref, rtol=1e-4, atol=1e-4)


# ---- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["awq", "smoothquant", "nvfp4", "fp8"])
def test_quantized_checkpoint_loads_back(tiny_llama, tmp_path, method):
    llm = load(tiny_llama.path)
    stats = collect_input_stats(llm, random_prompts([32] * 2, seed=4))
    quant = quantize_llm(llm, method, [], group_size=GROUP, stats=stats)
    prompts = random_prompts([20], seed=6)
    want = logits_of(llm, prompts)
    save_quantized(llm, quant, str(tmp_path / "q"))
    cfg = json.load(open(tmp_path / "q" / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == method
    back = load(str(tmp_path / "q"))
    assert back.engine.model_config.quantization.method == method
    torch.testing.assert_close(logits_of(back, prompts), want, rtol=0, atol=0)


def _fp_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def _write_ckpt(src: str, dst: str, tensors: dict[str, torch.Tensor], qc: dict) -> None:
    from safetensors.torch import save_file
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = qc
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_autoawq_gemm_checkpoint_loads(tiny_llama, tmp_path):
    tensors, expected = {}, {}
    for name, t in _fp_tensors(tiny_llama.path).items():
        if name.rsplit(".", 2)[-2] not in PROJ:
            tensors[name] = t
            continue
        q, s, z = quantize_int4(t, GROUP)                       # [out, in] views
        base = name.removesuffix(".weight")
        tensors[base + ".qweight"] = awq_pack_cols(q.t().contiguous())       # [in, out / 8]
        tensors[base + ".qzeros"] = awq_pack_cols(z.t().contiguous())        # [in / g, out / 8]
        tensors[base + ".scales"] = s.t().contiguous().half()                # [in / g, out]
        expected[base] = dequantize_int4(pack_int4(q), s.half().float(), z)
    _write_ckpt(tiny_llama.path, str(tmp_path / "awq"), tensors,
                {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"})
    llm = load(str(tmp_path / "awq"))
    attn = llm.engine.runner.model.model.layers[1].self_attn
    got = attn.qkv_proj.method.dequantize(attn.qkv_proj)
    want = torch.cat([expected[f"model.layers.1.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_nvfp4_checkpoint_layouts_load(tiny_llama, tmp_path, layout):
    tensors, expected = {}, {}
    for name, t in _fp_tensors(tiny_llama.path).items():
        if name.rsplit(".", 2)[-2] not in PROJ:
            tensors[name] = t
            continue
        base = name.removesuffix(".weight")
        packed, bs, gs = quantize_nvfp4(t)     # each projection with its own global scale
        expected[base] = dequantize_nvfp4(packed, bs, gs)
        if layout == "modelopt":
            tensors.update({base + ".weight": packed, base + ".weight_scale": bs,
                            base + ".weight_scale_2": gs.reshape(()), base + ".input_scale": torch.tensor(1.0)})
        else:
            tensors.update({base + ".weight_packed": packed, base + ".weight_scale": bs,
                            base + ".weight_global_scale": (1 / gs).reshape(1),
                            base + ".input_global_scale": torch.tensor([1.0])})
    qc = ({"quant_method": "modelopt", "quant_algo": "NVFP4"} if layout == "modelopt"
          else {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"})
    _write_ckpt(tiny_llama.path, str(tmp_path / layout), tensors, qc)
    llm = load(str(tmp_path / layout))
    mlp = llm.engine.runner.model.model.layers[0].mlp
    got = mlp.gate_up_proj.method.dequantize(mlp.gate_up_proj)
    want = torch.cat([expected[f"model.layers.0.mlp.{p}"] for p in ("gate_proj", "up_proj")])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)


# ---- perplexity -----------------------------------------------------------------------------
def test_perplexity_matches_transformers_and_slides(tiny_llama, fp):
    llm, _, _ = fp
    ids = random_prompts([100], seed=8)[0]
    with torch.no_grad():
        hf = tiny_llama.hf_model(torch.tensor([ids])).logits[0, :-1].float()
    want = math.exp(torch.nn.functional.cross_entropy(hf, torch.tensor(ids[1:])).item())
    whole = perplexity(llm, ids, window=128, stride=64)
    assert whole.tokens_scored == 99
    assert whole.ppl == pytest.approx(want, rel=1e-4)
    # A naive oracle: token t is scored by the first window (begin k * stride) ending after
    # it, from that window's tokens before t.
    for window, stride in ((26, 25), (50, 20)):
        got = perplexity(llm, ids, window=window, stride=stride)
        assert got.tokens_scored == 99
        nll = 0.0
        for t in range(1, 100):
            k = 0
            while k * stride + window <= t:
                k += 1
            lg = sequence_logits(llm, ids[k * stride:t])[-1:]
            nll += torch.nn.functional.cross_entropy(lg, torch.tensor([ids[t]], device=lg.device)).item()
        assert got.nll == pytest.approx(nll / 99, rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(llm, ids, window=25, stride=25)


# ---- the real model -------------------------------------------------------------------------
# SmolLM2 was distributed with Q4_1 weights: "full precision" is those weights dequantized.
def test_smollm2_int4_perplexity_stays_close(smollm2_gguf_path):
    pytest.importorskip("gguf")
    from ember.eval.ppl import read_split
    text = "/work/shared/data/wizard_of_oz.txt"
    here = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wizard_of_oz.txt")
    text = here if os.path.isfile(here) else text
    if not os.path.isfile(text):
        pytest.skip("wizard_of_oz.txt not available")
    llm = LLM("smollm2-135m", dtype="float32", max_model_len=300, num_kv_blocks=20, prefix_cache="none")
    ids = llm.get_tokenizer().encode(read_split(text, 0.8), add_special_tokens=False)[:193]
    base = perplexity(llm, ids, window=193, stride=96).ppl
    assert 5 < base < 60  # a sane model on English prose
    quantize_llm(llm, "rtn", [], group_size=128)   # INT4 g128 (96 where 128 does not divide)
    q = perplexity(llm, ids, window=193, stride=96).ppl
    # Measured 1.20 on 256 tokens; the full table is in docs/BENCHMARKS.md.
    assert q != base and q / base < 1.35, (q, base)


def test_quantize_cli_writes_a_loadable_checkpoint(tiny_llama, tmp_path, capsys):
    from ember.cli import main
    out = str(tmp_path / "fp8")
    main(["quantize", "--model", tiny_llama.path, "--method", "fp8", "--dtype", "float32", "--out", out])
    assert "wrote fp8 checkpoint" in capsys.readouterr().out
    llm = load(out)
    lin = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert lin.weight.dtype == torch.float8_e4m3fn
    with pytest.raises(SystemExit):  # awq without calibration text is refused
        main(["quantize", "--model", tiny_llama.path, "--method", "awq", "--out", str(tmp_path / "x")])


# ---- the LM head ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama-gqa", "llama-tied"])
def test_quantized_lm_head_on_load(tiny_checkpoints, arch):
    # --quantize-lm-head: the head is a Linear in the model's format (a tied head a quantized
    # copy of the embedding, which itself stays exact) and the logits are x @ dequant(head)^T.
    ckpt = tiny_checkpoints(arch)
    plain = load(ckpt.path, quantization="awq")
    llm = load(ckpt.path, quantization="awq", quantize_lm_head=True)
    model, ref_model = llm.engine.runner.model, plain.engine.runner.model
    head = model.lm_head
    assert type(head.method).__name__ == "Int4LinearMethod" and not hasattr(head, "weight")
    assert llm.engine.model_config.quantization.params["lm_head"] is True
    emb = model.model.embed_tokens.weight
    torch.testing.assert_close(emb, ref_model.model.embed_tokens.weight, rtol=0, atol=0)
    fp_head = emb if arch == "llama-tied" else ref_model.lm_head.weight
    w = head.method.dequantize(head)
    assert 0 < rel_err(w, fp_head) < 0.2            # RTN INT4 of the full-precision head
    h = torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(2)).to(emb.device)
    tol = 1e-5 if emb.device.type == "cpu" else 2e-3     # the GPU kernels' own summation order
    torch.testing.assert_close(model.compute_logits(h), h @ w.t(), rtol=tol, atol=tol * 10)
    prompts = random_prompts([24], seed=3)
    err = rel_err(logits_of(llm, prompts), logits_of(plain, prompts))
    assert 0 < err < 0.4


def test_quantize_lm_head_needs_a_quantization(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="needs a quantization"):
        load(tiny_llama.path, quantize_lm_head=True)
    llm = load(tiny_llama.path)
    quant = quantize_llm(llm, "fp8", [])
    save_quantized(llm, quant, str(tmp_path / "q"))
    with pytest.raises(ValueError, match="LM head is not quantized"):
        load(str(tmp_path / "q"), quantize_lm_head=True)


def test_quantize_cli_lm_head_round_trip(tiny_checkpoints, tmp_path):
    # `ember quantize --lm-head` on a tied model writes the head's own quantized tensors;
    # the checkpoint loads back (without the flag) to the same logits as the quantized
    # model in memory.
    from ember.cli import main
    ckpt = tiny_checkpoints("llama-tied")
    out = str(tmp_path / "rtn")
    main(["quantize", "--model", ckpt.path, "--method", "rtn", "--group-size", str(GROUP),
          "--dtype", "float32", "--lm-head", "--out", out])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["lm_head"] is True and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"lm_head.qweight", "lm_head.scales", "lm_head.qzeros", "model.embed_tokens.weight"} <= names
    llm = load(ckpt.path)
    quantize_llm(llm, "rtn", [], group_size=GROUP, extra_params={"lm_head": True})
    back = load(out)
    assert back.engine.runner.model.lm_head is not None
    prompts = random_prompts([20], seed=8)
    torch.testing.assert_close(logits_of(back, prompts), logits_of(llm, prompts), rtol=0, atol=0)


def test_awq_head_beats_rtn_on_the_head_output(tiny_llama):
    # AWQ for the LM head (ember quantize --method awq --lm-head): with outlier channels
    # planted in the final norm, the searched scales (folded into that norm) and clipping
    # must give held-out logits much closer to full precision than the head's RTN.
    from ember.quant.awq_calibrate import awq_head
    from ember.quant.int4 import fake_quantize_int4
    llm = load(tiny_llama.path)
    model = llm.engine.runner.model
    norm, head = model.model.norm, model.lm_head
    norm.weight.data[OUTLIERS] *= 30.0
    head.weight.data[:, OUTLIERS] /= 30.0
    held = random_prompts([48] * 4, seed=12)
    dev = head.weight.device
    x = collect_input_stats(llm, held, rows_per_seq=48, head=True)["lm_head"].sample.to(dev)
    ref = x @ head.weight.t()
    rtn_err = (x @ fake_quantize_int4(head.weight, GROUP).t() - ref).pow(2).mean()
    calib = collect_input_stats(llm, random_prompts([64] * 8, seed=11), gram=True, head=True)
    alpha, loss, rtn = awq_head(model, calib["lm_head"], GROUP)
    assert alpha is not None and loss < rtn
    x2 = collect_input_stats(llm, held, rows_per_seq=48, head=True)["lm_head"].sample.to(dev)   # after the fold
    awq_err = (x2 @ fake_quantize_int4(head.weight, GROUP).t() - ref).pow(2).mean()
    assert awq_err < 0.5 * rtn_err, (awq_err, rtn_err)


def test_quantize_llm_awq_lm_head_searches_the_head(tiny_checkpoints, tmp_path):
    # quantize_llm("awq", lm_head) on a tied model: the head becomes a quantized copy of the
    # embedding with its AWQ scales folded into the final norm (the embedding untouched),
    # and the checkpoint loads back to the same logits.
    ckpt = tiny_checkpoints("llama-tied")
    llm = load(ckpt.path)
    model = llm.engine.runner.model
    emb, norm = model.model.embed_tokens.weight.clone(), model.model.norm.weight.clone()
    stats = collect_input_stats(llm, random_prompts([32] * 4, seed=4), gram=True, head=True)
    quant = quantize_llm(llm, "awq", [], group_size=GROUP, stats=stats, extra_params={"lm_head": True})
    assert not torch.equal(model.model.norm.weight, norm)               # the head's scales
    torch.testing.assert_close(model.model.embed_tokens.weight, emb, rtol=0, atol=0)
    assert hasattr(model.lm_head, "qweight")
    prompts = random_prompts([20], seed=6)
    want = logits_of(llm, prompts)
    save_quantized(llm, quant, str(tmp_path / "q"))
    torch.testing.assert_close(logits_of(load(str(tmp_path / "q")), prompts), want, rtol=0, atol=0)
