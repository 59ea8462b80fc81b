"""Model parity with Hugging Face transformers: logits at fp32 tolerance and token-identical
greedy generations, on tiny random checkpoints of every supported architecture and on the
real SmolLM2-135M-Instruct GGUF."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import TinyCheckpoint, assert_no_leaks, random_prompts
from ember import LLM, SamplingParams
from ember.engine.forward_batch import ForwardBatch

BLOCK_SIZE = 8


@pytest.fixture(scope="module")
def tiny_llm(tiny_ckpt: TinyCheckpoint) -> LLM:
    # 64 blocks of 8 = 512 KV tokens: room for every prompt below at once.
    return LLM(tiny_ckpt.path, num_kv_blocks=64, block_size=BLOCK_SIZE, dtype="float32")


@torch.inference_mode()
def ember_logits(llm: LLM, token_ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits [n, vocab] for every position of one sequence, computed by ember's model in
    successive forwards of `chunks` tokens each. A 1-token chunk takes the attention
    backend's decode path; a chunk after the first reads its context from the paged cache.

    The sequence's blocks are taken from the engine's pool in reverse order, so a block
    table that were ignored (or read as contiguous) would give wrong attention.
    """
    engine, runner = llm.engine, llm.engine.runner
    assert sum(chunks) == len(token_ids)
    bs = runner.block_size
    engine.prefix_cache.reset()  # cached prefixes may hold blocks; nothing is running
    blocks = engine.block_pool.allocate(-(-len(token_ids) // bs))[::-1]
    table = torch.tensor([blocks], dtype=torch.int32)
    out, start = [], 0
    try:
        for size in chunks:
            end = start + size
            pos = torch.arange(start, end)
            fb = ForwardBatch(
                input_ids=torch.tensor(token_ids[start:end]), positions=pos,
                slot_mapping=table[0, pos // bs].long() * bs + pos % bs,
                query_start_loc=[0, size], seq_lens=torch.tensor([end]), seq_lens_list=[end],
                block_tables=table, num_decodes=int(size == 1),
                logits_indices=torch.arange(size), block_size=bs)
            runner.backend.prepare(fb)
            hidden = runner.model(fb.input_ids, fb.positions, fb)
            out.append(runner.model.compute_logits(hidden))
            start = end
    finally:
        engine.block_pool.free(blocks)
    return torch.cat(out)


@torch.inference_mode()
def hf_logits(ckpt: TinyCheckpoint, token_ids: list[int]) -> torch.Tensor:
    return ckpt.hf_model(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, never stopping at EOS."""
    ids = torch.tensor([token_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=0,
                         eos_token_id=None, pad_token_id=0)
    new = out[0, len(token_ids):].tolist()
    assert len(new) == max_new_tokens
    return new


# Chunkings of a 100-token prompt: whole prefill; prefill chunks reading cached context and
# single-token decode steps in between (positions cross 64, the llama3 original context).
CHUNKINGS = {
    "whole": [100],
    "chunked": [37, 1, 1, 20, 41],
    "decode-tail": [90] + [1] * 10,
}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_logits_match_transformers(tiny_ckpt: TinyCheckpoint, tiny_llm: LLM, chunking: str) -> None:
    (prompt,) = random_prompts([100], seed=11)
    expected = hf_logits(tiny_ckpt, prompt)
    got = ember_logits(tiny_llm, prompt, CHUNKINGS[chunking])
    assert got.shape == expected.shape == (100, tiny_ckpt.config.vocab_size)
    # Logits are O(1) (std ~1): these bounds are fp32 rounding, far below any real bug.
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_logits_single_token_prompt(tiny_ckpt: TinyCheckpoint, tiny_llm: LLM) -> None:
    prompt = [1]
    torch.testing.assert_close(ember_logits(tiny_llm, prompt, [1]), hf_logits(tiny_ckpt, prompt),
                               atol=2e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(tiny_ckpt: TinyCheckpoint, tiny_llm: LLM) -> None:
    # Lengths straddle block boundaries; the longest runs past position 64.
    prompts = random_prompts([3, 8, 17, 80], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == hf_greedy(tiny_ckpt.hf_model, prompt, 24), \
            f"{tiny_ckpt.name}: prompt of {len(prompt)} tokens diverged from transformers"
    assert_no_leaks(tiny_llm.engine)


def test_llama3_rope_scaling_is_applied(tiny_checkpoints) -> None:
    """The llama3 checkpoint must really differ from an unscaled one past the original
    context; otherwise its parity test would not be testing the scaling."""
    from ember.layers.rotary import compute_inv_freq
    cfg = tiny_checkpoints("llama3-rope").config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    scaled = compute_inv_freq(head_dim, theta, cfg.rope_parameters)
    plain = compute_inv_freq(head_dim, theta, None)
    assert not torch.allclose(scaled, plain)
    # Highest frequencies are kept, lowest divided by the factor (8).
    assert scaled[0] == plain[0]
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)


# ---- the real default model -------------------------------------------------------------
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "List three prime numbers."}],
]


def test_smollm2_gguf_greedy_matches_transformers(smollm2_gguf_path: str, smollm2_llm: LLM,
                                                 monkeypatch) -> None:
    """ember's GGUF loader (dequantization, Q/K layout, tied head) against transformers' own
    GGUF loader: greedy tokens identical for 32 tokens on three chat prompts run as a batch."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    import functools

    import gguf
    from transformers import AutoModelForCausalLM
    # transformers parses the GGUF twice (config, then tensors) and rebuilds the same
    # tensor-name table once per module (~400 times). Both are pure functions of their
    # arguments (the reader is a read-only memory map): memoize them for this load only,
    # which saves tens of seconds of CPU.
    monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    prompts = [smollm2_llm.apply_chat_template(c)["prompt_token_ids"] for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = smollm2_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path),
        dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
