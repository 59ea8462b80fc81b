"""The vLLM-shaped offline API (`LLM.generate`, `LLM.chat`, SamplingParams, RequestOutput).

Tokenizer-dependent behaviour runs on the real SmolLM2-135M-Instruct (skipped when it is
not installed); logprob values are checked against transformers on a tiny checkpoint.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TinyCheckpoint, random_prompts
from ember import LLM, SamplingParams

PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture
def llm(smollm2_llm: LLM) -> LLM:
    yield smollm2_llm
    # Each test must leave the shared engine idle, with no block held but by the prefix
    # cache (kept: later tests reuse cached prompts, which must not change their outputs).
    engine = smollm2_llm.engine
    assert not engine.has_unfinished_requests()
    pool = engine.block_pool
    assert pool.num_free + engine.prefix_cache.num_evictable_blocks == pool.num_blocks


# ---- prompts and outputs ----------------------------------------------------------------
def test_str_and_token_id_prompts(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    by_text, by_ids, by_dict = llm.generate(
        [PROMPT, {"prompt_token_ids": ids}, {"prompt": PROMPT}], greedy(12), use_tqdm=False)
    assert by_text.prompt == PROMPT and by_text.prompt_token_ids == ids
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert by_dict.prompt == PROMPT
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids == by_dict.outputs[0].token_ids
    out = by_text
    assert out.finished and isinstance(out.request_id, str)
    assert len({by_text.request_id, by_ids.request_id, by_dict.request_id}) == 3
    (c,) = out.outputs
    assert c.index == 0 and len(c.token_ids) == 12
    assert c.finish_reason == "length" and c.stop_reason is None
    assert c.logprobs is None and c.cumulative_logprob is None and out.prompt_logprobs is None
    assert c.text == tok.decode(c.token_ids) and c.text.strip()


def test_outputs_follow_prompt_order(llm: LLM) -> None:
    prompts = ["Once upon a time", "def fibonacci(n):", "The capital of Japan is"]
    batched = llm.generate(prompts, greedy(6), use_tqdm=False)
    for p, out in zip(prompts, batched):
        alone = llm.generate(p, greedy(6), use_tqdm=False)[0]
        assert out.prompt == p
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in batched}) == 3


def test_max_tokens_is_length(llm: LLM) -> None:
    for n in (1, 5):
        (c,) = llm.generate(PROMPT, greedy(n), use_tqdm=False)[0].outputs
        assert len(c.token_ids) == n and c.finish_reason == "length"


def test_sampling_params_per_prompt_must_match_count(llm: LLM) -> None:
    with pytest.raises(ValueError):
        llm.generate([PROMPT, PROMPT], [greedy(2)] * 3, use_tqdm=False)


# ---- n and seeds ------------------------------------------------------------------------
def test_n_completions_with_seed(llm: LLM) -> None:
    sp = SamplingParams(n=2, temperature=1.0, seed=1234, max_tokens=8)
    (out,) = llm.generate(PROMPT, sp, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1]
    a, b = (c.token_ids for c in out.outputs)
    assert len(a) == len(b) == 8
    assert a != b  # two independent streams
    (again,) = llm.generate(PROMPT, sp, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [a, b]  # the seed reproduces both


def test_seeded_request_same_alone_and_in_batch(llm: LLM) -> None:
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=8)
    alone = llm.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(
        ["Once upon a time", PROMPT, "def fibonacci(n):", PROMPT],
        [SamplingParams(temperature=1.0, max_tokens=10),
         sp,
         SamplingParams(temperature=0.7, seed=99, max_tokens=5),
         SamplingParams(temperature=0.9, top_p=0.95, seed=8, max_tokens=8)],
        use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert batch[3].outputs[0].token_ids != alone  # a different seed does matter


# ---- stopping ---------------------------------------------------------------------------
def test_stop_string_truncates_text(llm: LLM) -> None:
    ref = llm.generate(PROMPT, greedy(16, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = ref.text
    # A 3-character stop string first occurring in the middle third of the text.
    j = next(j for j in range(len(text) // 3, 2 * len(text) // 3)
             if text[j:j + 3].strip() and text.find(text[j:j + 3]) == j)
    stop = text[j:j + 3]
    (c,) = llm.generate(PROMPT, greedy(16, ignore_eos=True, stop=[stop, "@@never@@"]),
                        use_tqdm=False)[0].outputs
    assert c.text == text[:j]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert 0 < len(c.token_ids) <= 16 and c.token_ids == ref.token_ids[:len(c.token_ids)]
    (c,) = llm.generate(PROMPT, greedy(16, ignore_eos=True, stop=stop,
                                       include_stop_str_in_output=True), use_tqdm=False)[0].outputs
    assert c.text == text[:j + len(stop)] and c.stop_reason == stop


def test_stop_token_ids(llm: LLM) -> None:
    ref = llm.generate(PROMPT, greedy(16, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    k = next(k for k in range(3, 16) if ref.index(ref[k]) == k)  # first occurrence
    (c,) = llm.generate(PROMPT, greedy(16, ignore_eos=True, stop_token_ids=[ref[k]]),
                        use_tqdm=False)[0].outputs
    assert c.token_ids == ref[:k + 1]  # the stop token is kept, as in vLLM
    assert c.finish_reason == "stop" and c.stop_reason == ref[k]


def test_eos_ends_chat_answer(llm: LLM) -> None:
    (out,) = llm.chat(CHAT, greedy(48), use_tqdm=False)
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.token_ids[-1] in llm.engine.eos_token_ids
    assert "Paris" in c.text and len(c.token_ids) < 48


# ---- logprobs ---------------------------------------------------------------------------
def test_logprobs_top3(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    (c,) = llm.generate(PROMPT, greedy(8, logprobs=3), use_tqdm=False)[0].outputs
    assert len(c.logprobs) == len(c.token_ids) == 8
    for tid, pos in zip(c.token_ids, c.logprobs):
        assert len(pos) == 3 and tid in pos  # greedy: the chosen token is in the top 3
        assert pos[tid].rank == 1
        assert sorted(lp.rank for lp in pos.values()) == [1, 2, 3]
        by_rank = sorted(pos.values(), key=lambda lp: lp.rank)
        assert all(a.logprob >= b.logprob for a, b in zip(by_rank, by_rank[1:]))
        assert all(lp.logprob <= 0 for lp in pos.values())
        assert sum(math.exp(lp.logprob) for lp in pos.values()) <= 1 + 1e-5
        assert pos[tid].decoded_token == tok.decode([tid], skip_special_tokens=False)
    assert c.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs)),
                                                 abs=1e-4)


def test_sampled_token_logprobs_agree_with_prompt_logprobs(llm: LLM) -> None:
    """Two code paths score the same tokens: decode-step logprobs of generated tokens, and
    prompt logprobs when those tokens are fed back as part of a prompt."""
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    (c,) = llm.generate(PROMPT, greedy(6, logprobs=2, ignore_eos=True), use_tqdm=False)[0].outputs
    out = llm.generate({"prompt_token_ids": ids + c.token_ids},
                       greedy(1, prompt_logprobs=2), use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(ids) + 6 and plp[0] is None
    for i, (tid, pos) in enumerate(zip(c.token_ids, c.logprobs)):
        scored = plp[len(ids) + i]
        assert set(scored) == set(pos)
        for t in pos:
            assert scored[t].logprob == pytest.approx(pos[t].logprob, abs=1e-3)
            assert scored[t].rank == pos[t].rank


def test_prompt_logprobs(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    out = llm.generate(PROMPT, greedy(2, prompt_logprobs=3), use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for tid, pos in zip(ids[1:], plp[1:]):
        assert tid in pos and pos[tid].logprob <= 0 and pos[tid].rank >= 1
        top = [t for t, lp in pos.items() if lp.rank <= 3]
        assert len(top) == 3
        assert all(pos[t].logprob >= pos[tid].logprob for t in top if pos[t].rank < pos[tid].rank)
    (zero,) = llm.generate(PROMPT, greedy(2, prompt_logprobs=0), use_tqdm=False)
    assert [list(p) for p in zero.prompt_logprobs[1:]] == [[t] for t in ids[1:]]


# ---- chat -------------------------------------------------------------------------------
def test_chat_applies_template(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    (out,) = llm.chat(CHAT, greedy(12, ignore_eos=True), use_tqdm=False)
    assert out.prompt == text
    assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    (same,) = llm.generate({"prompt_token_ids": out.prompt_token_ids}, greedy(12, ignore_eos=True),
                           use_tqdm=False)
    assert out.outputs[0].token_ids == same.outputs[0].token_ids
    assert out.outputs[0].text.startswith("The capital of France is Paris")
    # A list of conversations gives one output each, in order.
    two = llm.chat([CHAT, [{"role": "user", "content": "Say hi."}]], greedy(4), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids[:4]
    assert "Say hi." in two[1].prompt


def test_string_prompt_needs_tokenizer(tiny_llama: TinyCheckpoint) -> None:
    llm = LLM(tiny_llama.path, num_kv_blocks=32, block_size=8, dtype="float32")
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", greedy(2), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1, 5, 9]}, greedy(2), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].text == ""


# ---- logprob values against transformers (tiny model, no tokenizer needed) --------------
@pytest.mark.parametrize("budget", [None, 5])
def test_logprobs_match_transformers(tiny_llama: TinyCheckpoint, budget) -> None:
    """Prompt logprobs (whole or chunked prefill) and sampled-token logprobs are the
    log-softmax of transformers' logits, with ranks and top-k ids to match."""
    llm = LLM(tiny_llama.path, num_kv_blocks=64, block_size=4, dtype="float32",
              max_num_batched_tokens=budget)
    (prompt,) = random_prompts([19], seed=21)
    out = llm.generate({"prompt_token_ids": prompt},
                       greedy(6, logprobs=4, prompt_logprobs=4, ignore_eos=True), use_tqdm=False)[0]
    gen = out.outputs[0].token_ids
    seq = prompt + gen
    with torch.inference_mode():
        ref = torch.log_softmax(tiny_llama.hf_model(torch.tensor([seq])).logits[0].float(), -1)
    # Row p of `ref` scores token p + 1.
    scored = [(out.prompt_logprobs[p], prompt[p], ref[p - 1]) for p in range(1, len(prompt))]
    scored += [(out.outputs[0].logprobs[i], gen[i], ref[len(prompt) + i - 1]) for i in range(6)]
    for pos, tid, row in scored:
        assert pos[tid].logprob == pytest.approx(row[tid].item(), abs=1e-4)
        assert pos[tid].rank == int((row > row[tid]).sum()) + 1
        top = row.topk(4).indices.tolist()
        assert {t for t, lp in pos.items() if lp.rank <= 4} == set(top)
        for t in top:
            assert pos[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
