"""Shared fixtures: tiny random Hugging Face checkpoints (one per architecture ember claims
to support) and the real SmolLM2-135M-Instruct GGUF when it is installed.

The tiny checkpoints are built with transformers itself and saved with `save_pretrained`
(safetensors), so the parity tests compare ember against the reference implementation on
exactly the files ember loads. Weights use a larger init range than the default so the
top logits are well separated and greedy decoding is not decided by rounding noise.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

# The tests run many small ops, where a second intra-op thread costs more than it gains,
# and on a busy 2-core machine an oversubscribed OpenMP pool makes every op ~20x slower
# (measured: the suite went from under 2 to 9 minutes). One thread unless the caller
# chose a number with OMP_NUM_THREADS.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# Without a GPU, Triton kernels run only in its interpreter, which Triton reads from
# TRITON_INTERPRET when it is first imported, and importing transformers' models imports
# triton. Set it here, before any test module is collected, so the Triton tests never
# depend on which module happened to import triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 256
BOS, EOS, PAD = 1, 2, 0
INIT_RANGE = 0.1

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    initializer_range=INIT_RANGE, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    rms_norm_eps=1e-6,
)


def _llama(**kw: Any):
    from transformers import LlamaConfig
    args = dict(_COMMON, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=256, tie_word_embeddings=False)
    args.update(kw)
    return LlamaConfig(**args)


def _qwen3(**kw: Any):
    from transformers import Qwen3Config
    # head_dim 32 != hidden / heads (16): catches code that derives it from hidden size.
    args = dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=256, tie_word_embeddings=False)
    args.update(kw)
    return Qwen3Config(**args)


def _mistral(**kw: Any):
    from transformers import MistralConfig
    # sliding_window above the context: plain causal attention (what ember implements).
    args = dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False)
    args.update(kw)
    return MistralConfig(**args)


# name -> config factory. Every architecture ember registers has at least one entry.
TINY_ARCHS: dict[str, Callable[[], Any]] = {
    "llama-mha": lambda: _llama(),
    "llama-gqa": lambda: _llama(num_key_value_heads=2),
    "llama-mqa": lambda: _llama(num_key_value_heads=1),
    "llama-tied": lambda: _llama(num_key_value_heads=2, tie_word_embeddings=True),
    # Llama 3.1 rope scaling; the context (512) runs well past the original 64 positions.
    "llama3-rope": lambda: _llama(
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # The same, with config.json in the transformers 4 layout that released Llama 3.1
    # checkpoints use: top-level rope_theta and rope_scaling, no rope_parameters.
    "llama3-rope-v4cfg": lambda: _llama(
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": lambda: _qwen3(),
    "qwen3-tied": lambda: _qwen3(tie_word_embeddings=True),
    "mistral": lambda: _mistral(),
}


@dataclass
class TinyCheckpoint:
    name: str
    path: str
    config: Any   # the transformers config it was built from
    # The transformers model in fp32 eval mode: the oracle.
    hf_model: Any


def _build_checkpoint(name: str, root) -> TinyCheckpoint:
    from transformers import AutoModelForCausalLM
    config = TINY_ARCHS[name]()
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = str(root / name)
    model.save_pretrained(path, safe_serialization=True)
    if name.endswith("-v4cfg"):
        _to_v4_rope_config(os.path.join(path, "config.json"))
    return TinyCheckpoint(name, path, config, model)


def _to_v4_rope_config(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Callable[[str], TinyCheckpoint]:
    """Builds (once per session) and returns the tiny checkpoint of the given name."""
    pytest.importorskip("transformers", reason="transformers is the parity oracle")
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, TinyCheckpoint] = {}

    def get(name: str) -> TinyCheckpoint:
        if name not in cache:
            cache[name] = _build_checkpoint(name, root)
        return cache[name]
    return get


@pytest.fixture(scope="session", params=sorted(TINY_ARCHS))
def tiny_ckpt(request, tiny_checkpoints) -> TinyCheckpoint:
    """Parametrized over every tiny architecture."""
    return tiny_checkpoints(request.param)


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> TinyCheckpoint:
    """A small GQA Llama for engine-level tests (batching, preemption, ...)."""
    return tiny_checkpoints("llama-gqa")


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of random non-special token ids, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]


# ---- the real default model -------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF; skips when the package (or finder) is missing."""
    try:
        from ember.models.smollm2 import find_smollm2_gguf
    except ImportError as e:
        pytest.skip(f"ember.models.smollm2 is not importable ({e})")
    try:
        return find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf_path):
    """One ember LLM on the real SmolLM2 model, shared by every test that needs a tokenizer."""
    pytest.importorskip("gguf", reason="loading GGUF files needs the gguf package")
    from ember import LLM
    return LLM("smollm2-135m", max_model_len=512)


def assert_no_leaks(engine) -> None:
    """The engine is idle and every KV block is accounted for: blocks not on the free list
    are held only by the prefix cache, unlocked, and evicting them frees the whole pool."""
    pool, cache = engine.block_pool, engine.prefix_cache
    assert not engine.has_unfinished_requests()
    assert pool.num_free + cache.num_evictable_blocks == pool.num_blocks
    cache.reset()
    assert pool.num_free == pool.num_blocks
    assert all(c == 0 for c in pool.ref_counts)
