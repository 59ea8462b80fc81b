"""Speculative decoding in the engine: greedy output token-identical to plain decoding,
speculating and ordinary requests in one batch, rollback without block leaks (prefix
cache, preemption), stops and logprobs inside a multi-token step."""
from __future__ import annotations

import random

import pytest
from _spec_helpers import mixed_batch_params, record_step_kinds
from conftest import TinyCheckpoint, assert_no_leaks, random_prompts

from ember import LLM, SamplingParams
from ember.engine.scheduler import SchedulerOutput
from ember.spec.proposer import Proposer

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LENGTHS = [3, 5, 9, 14, 20, 27, 33, 40]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False}


def make_llm(ckpt: TinyCheckpoint, **kw) -> LLM:
    args = dict(num_kv_blocks=256, block_size=4, dtype="float32", max_model_len=128)
    args.update(kw)
    return LLM(ckpt.path, **args)


def run(llm: LLM, prompts: list[list[int]], params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [o.outputs[0].token_ids for o in outs], outs


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Repeat each prompt's tail so n-gram lookup finds matches from the first step.
    base = random_prompts(LENGTHS, seed=5)
    return [p + p[1:] for p in base]


@pytest.fixture(scope="module")
def reference(tiny_llama: TinyCheckpoint, prompts) -> list[list[int]]:
    tokens, _ = run(make_llm(tiny_llama), prompts)
    return tokens


class OracleProposer(Proposer):
    """Drafts the known greedy continuation, corrupted at random positions, so a step
    may accept all, some or none of its drafts (exercises every rollback path)."""

    name = "oracle"

    def __init__(self, reference: dict[tuple[int, ...], list[int]], error_rate: float,
                 kv_lag: int = 0, seed: int = 0) -> None:
        self.reference = reference
        self.error_rate = error_rate
        self.kv_lag = kv_lag
        self.rng = random.Random(seed)

    def propose(self, batch: SchedulerOutput) -> None:
        for s in batch.scheduled:
            if s.num_spec_slots == 0:
                continue
            r = s.request
            future = self.reference[tuple(r.prompt_token_ids)][r.num_output_tokens:]
            drafts = future[:s.num_spec_slots]
            s.spec_token_ids = [t if self.rng.random() > self.error_rate else (t + 1) % 256
                                for t in drafts]


def oracle_llm(tiny_llama, prompts, reference, error_rate, kv_lag=0, **kw) -> LLM:
    llm = make_llm(tiny_llama, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                    "adaptive": False}, **kw)
    oracle = OracleProposer({tuple(p): t for p, t in zip(prompts, reference)}, error_rate, kv_lag)
    llm.engine.speculator.proposer = oracle
    llm.engine.speculator.kv_lag = kv_lag
    return llm


@pytest.mark.parametrize("engine_args", [{}, {"prefix_cache": "none"},
                                         {"max_num_batched_tokens": 16}, {"adaptive": True}],
                         ids=["radix", "no-cache", "small-budget", "adaptive"])
def test_greedy_ngram_is_token_identical(tiny_llama, prompts, reference, engine_args) -> None:
    adaptive = engine_args.pop("adaptive", False)
    llm = make_llm(tiny_llama, speculative_config=dict(NGRAM, adaptive=adaptive), **engine_args)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    # Adaptive k follows measured step times, so whether it drafts at all depends on the
    # machine (on a loaded CI runner it may keep speculation off): only then check drafts.
    if not adaptive or stats["num_draft_tokens"]:
        assert stats["num_accepted_tokens"] > 0
        assert stats["num_draft_tokens"] > stats["num_accepted_tokens"]   # some were rejected
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("kv_lag", [0, 1])
@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_oracle_drafts_accept_and_roll_back(tiny_llama, prompts, reference, error_rate,
                                            kv_lag) -> None:
    llm = oracle_llm(tiny_llama, prompts, reference, error_rate, kv_lag)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    if error_rate == 0.0:
        assert stats["acceptance_rate"] == 1.0
        # 24 tokens in steps of up to 5 (4 drafts + bonus), 4 with the lag's recompute.
        assert stats["mean_accepted_length"] > 3.0
    else:
        assert 0.2 < stats["acceptance_rate"] < 0.9
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("prefix_cache", ["none", "radix"])
def test_rollback_under_preemption_leaks_nothing(tiny_llama, prompts, reference,
                                                 prefix_cache) -> None:
    # 32 blocks of 4 = 128 tokens for 8 requests of up to ~100 tokens: constant preemption.
    llm = oracle_llm(tiny_llama, prompts, reference, 0.3, kv_lag=1, num_kv_blocks=32,
                     prefix_cache=prefix_cache)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 0
    assert_no_leaks(llm.engine)


def test_batch_mixes_speculating_and_ordinary_requests(tiny_llama, prompts, reference) -> None:
    llm = oracle_llm(tiny_llama, prompts, reference, 0.3, max_num_seqs=8)
    kinds = record_step_kinds(llm, lambda s: bool(s.spec_token_ids))
    # Staggered lengths: some requests still prefill or have prompt logprobs (never
    # speculate) while others decode with drafts.
    tokens, _ = run(llm, prompts, mixed_batch_params(len(prompts)))
    assert tokens == reference
    assert frozenset({True, False}) in kinds
    assert_no_leaks(llm.engine)


def test_penalties_and_min_tokens_see_the_drafts(tiny_llama, prompts) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3,
                            frequency_penalty=0.5, min_tokens=10)
    ref, _ = run(make_llm(tiny_llama), prompts, params)
    # Drafts that are the right (penalized) continuation reach the later positions,
    # whose target distribution must count the earlier drafts as output.
    llm = oracle_llm(tiny_llama, prompts, ref, 0.2)
    tokens, _ = run(llm, prompts, params)
    assert tokens == ref
    assert llm.engine.spec_stats()["acceptance_rate"] > 0.5


def test_stop_token_and_max_tokens_inside_a_step(tiny_llama, prompts, reference) -> None:
    # Stop at a token the reference emits mid-way: a step that emits it and more must
    # drop the rest, as plain decoding would never have produced them.
    stop = reference[2][9]
    params = SamplingParams(temperature=0.0, max_tokens=19, stop_token_ids=[stop], ignore_eos=True)
    ref, ref_outs = run(make_llm(tiny_llama), prompts, params)
    llm = oracle_llm(tiny_llama, prompts, reference, 0.0)
    tokens, outs = run(llm, prompts, params)
    assert tokens == ref
    assert [o.outputs[0].finish_reason for o in outs] == [o.outputs[0].finish_reason for o in ref_outs]
    assert any(len(t) < 19 for t in tokens)
    assert_no_leaks(llm.engine)


def test_last_steps_keep_full_drafts_and_count_only_kept_tokens(tiny_llama, prompts, reference) -> None:
    """Near max_tokens a request still gets all its draft slots (a step shrunk to the
    tokens left would leave the captured verify shapes on the GPU), except for its very
    last token; the tokens past max_tokens are dropped, and the statistics count only the
    drafts that could be kept."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = oracle_llm(tiny_llama, prompts[:1], reference[:1], 0.0)
    slots = record_step_kinds(llm, lambda s: s.num_spec_slots)
    tokens, outs = run(llm, prompts[:1], params)
    assert tokens == [reference[0][:4]] and outs[0].outputs[0].finish_reason == "length"
    # prefill (1 token), then one step of 4 drafts although 3 tokens were left: 5 sampled, 3 kept.
    assert slots == [frozenset({0}), frozenset({4})]
    st = llm.engine.spec_stats()
    assert (st["num_drafts"], st["num_draft_tokens"], st["num_accepted_tokens"]) == (1, 2, 2)
    assert st["mean_accepted_length"] == 3.0
    # 1 + 5 tokens, then two left: the step still drafts 4; with one left (max_tokens 7) none.
    for max_tokens, last in ((8, 4), (7, 0)):
        llm = oracle_llm(tiny_llama, prompts[:1], reference[:1], 0.0)
        slots = record_step_kinds(llm, lambda s: s.num_spec_slots)
        tokens, _ = run(llm, prompts[:1], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        assert tokens == [reference[0][:max_tokens]]
        assert slots == [frozenset({0}), frozenset({4}), frozenset({last})]
    assert_no_leaks(llm.engine)


def test_logprobs_of_every_emitted_token(tiny_llama, prompts, reference) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    _, ref_outs = run(make_llm(tiny_llama), prompts, params)
    llm = oracle_llm(tiny_llama, prompts, reference, 0.3)
    _, outs = run(llm, prompts, params)
    for o, r in zip(outs, ref_outs):
        lp, rlp = o.outputs[0].logprobs, r.outputs[0].logprobs
        assert len(lp) == len(o.outputs[0].token_ids) == 12
        for d, rd, t in zip(lp, rlp, o.outputs[0].token_ids):
            assert set(d) == set(rd)
            assert d[t].logprob == pytest.approx(rd[t].logprob, abs=1e-4)
        assert o.outputs[0].cumulative_logprob == pytest.approx(r.outputs[0].cumulative_logprob, abs=1e-3)


def test_seeded_sampling_is_reproducible(tiny_llama, prompts) -> None:
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=10 + i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    a, _ = run(make_llm(tiny_llama, speculative_config=NGRAM), prompts, params)
    llm = make_llm(tiny_llama, speculative_config=NGRAM)
    b, _ = run(llm, prompts[::-1], params[::-1])   # other order, other batch neighbours
    assert a == b[::-1]
    assert llm.engine.spec_stats()["num_draft_tokens"] > 0


def test_speculative_config_validation(tiny_llama) -> None:
    with pytest.raises(ValueError, match="unknown speculative method"):
        make_llm(tiny_llama, speculative_config={"method": "medusa"})
    with pytest.raises(ValueError, match="needs \"model\""):
        make_llm(tiny_llama, speculative_config='{"method": "draft"}')
    with pytest.raises(ValueError, match="unknown speculative config keys"):
        make_llm(tiny_llama, speculative_config={"method": "ngram", "k": 3})


def test_real_smollm2_greedy_ngram_identical(smollm2_llm) -> None:
    prompt = ("Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons. "
              "List: apples, pears, plums,")
    params = SamplingParams(temperature=0.0, max_tokens=40)
    ref = smollm2_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    llm = LLM("smollm2-135m", max_model_len=512, speculative_config=NGRAM)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 0
    # A stop string completed inside a multi-token step ends the text where plain
    # decoding ends it.
    words = ref.text.split()
    stop = SamplingParams(temperature=0.0, max_tokens=40, stop=[words[len(words) // 2]])
    a = smollm2_llm.generate([prompt], stop, use_tqdm=False)[0].outputs[0]
    b = llm.generate([prompt], stop, use_tqdm=False)[0].outputs[0]
    assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
    assert_no_leaks(llm.engine)


# ---- the draft-model proposer ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory) -> str:
    """A 1-layer random Llama with the tiny target's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(99)
    path = str(tmp_path_factory.mktemp("draft") / "tiny-draft")
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


def draft_config(model: str, k: int = 3) -> dict:
    return {"method": "draft", "model": model, "num_speculative_tokens": k, "adaptive": False}


@pytest.mark.parametrize("engine_args", [{}, {"num_kv_blocks": 32, "prefix_cache": "radix"},
                                         {"num_kv_blocks": 32, "prefix_cache": "none"}],
                         ids=["roomy", "preempt-radix", "preempt-no-cache"])
def test_draft_model_self_draft_accepts_all_greedy(tiny_llama, prompts, reference,
                                                   engine_args) -> None:
    """The target as its own draft: every greedy draft is right, so every step takes the
    full chain plus the bonus; any draft K/V the proposer wrongly believed valid (after a
    rollback, a preemption or a prefix-cache hit) would show up as a rejection."""
    llm = make_llm(tiny_llama, speculative_config=draft_config(tiny_llama.path), **engine_args)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    assert stats["acceptance_rate"] == 1.0
    assert stats["num_accepted_tokens"] > 0
    if engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


def test_draft_model_random_draft_greedy_identical(tiny_llama, prompts, reference, tiny_draft) -> None:
    llm = make_llm(tiny_llama, speculative_config=draft_config(tiny_draft))
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"]
    assert_no_leaks(llm.engine)


def test_draft_model_sampling_self_draft_accepts_nearly_all(tiny_llama, prompts) -> None:
    """With p == q (the target drafting for itself under the same sampling settings)
    the verifier must accept (almost) everything: checks q is computed as p is."""
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.2,
                            max_tokens=16, ignore_eos=True, seed=3)
    llm = make_llm(tiny_llama, speculative_config=draft_config(tiny_llama.path))
    run(llm, prompts, params)
    assert llm.engine.spec_stats()["acceptance_rate"] > 0.97
    assert_no_leaks(llm.engine)


def test_draft_model_vocab_mismatch_is_rejected(tiny_llama, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(tiny_llama, speculative_config=draft_config(str(tmp_path)))


@pytest.fixture(scope="module")
def noisy_self_draft(tiny_llama, tmp_path_factory) -> str:
    """The target with noise on every weight: a draft that is right only part of the time."""
    import copy

    import torch
    model = copy.deepcopy(tiny_llama.hf_model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=g) * 0.01)
    path = str(tmp_path_factory.mktemp("noisy") / "draft")
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_sampled_tokens_follow_the_target_end_to_end(tiny_llama, noisy_self_draft) -> None:
    """Many seeded requests on one prompt, drafted by a perturbed copy of the target (so
    drafts are accepted and rejected): the token after the first (the first one verified)
    must follow the target's top-k distribution given the first, computed independently
    with transformers."""
    import torch
    from test_rejection import chi2_pvalue

    from ember.layers.sampler import SamplingBatch, SamplingRow, sampling_probs
    prompt = random_prompts([6], seed=11)[0]
    n = 1200
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True, seed=1000 + i)
              for i in range(n)]
    llm = make_llm(tiny_llama, speculative_config=draft_config(noisy_self_draft), num_kv_blocks=1024)
    tokens, _ = run(llm, [prompt] * n, params)
    stats = llm.engine.spec_stats()
    assert 0.2 < stats["acceptance_rate"] < 0.95
    first = torch.tensor([t[0] for t in tokens])
    t1 = int(torch.bincount(first).argmax())
    second = torch.tensor([t[1] for t in tokens if t[0] == t1])
    assert len(second) > 200
    with torch.no_grad():
        logits = tiny_llama.hf_model(torch.tensor([prompt + [t1]])).logits[0, -1:]
    row = SamplingRow(SamplingParams(temperature=1.0, top_k=4), prompt, [t1])
    p = sampling_probs(logits, SamplingBatch.build([row], logits.shape[-1], "cpu"))[0]
    counts = torch.bincount(second, minlength=p.numel()).double()
    assert chi2_pvalue(counts, p) > 1e-4
