"""A KV pool too small for the whole batch: requests are preempted, recomputed, and still
give exactly the tokens they would have with room to spare; bad or aborted requests
leave the engine serving the others with every block accounted for."""
from __future__ import annotations

import pytest

from conftest import TinyCheckpoint, assert_no_leaks, random_prompts
from ember import LLM, SamplingParams
from ember.engine.engine import PromptTooLongError

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
LENGTHS = [9, 14, 21, 27, 30, 6, 18, 25]


def make_llm(ckpt: TinyCheckpoint, num_kv_blocks: int, **kw) -> LLM:
    return LLM(ckpt.path, num_kv_blocks=num_kv_blocks, block_size=4, dtype="float32",
               max_model_len=64, **kw)


def run(llm: LLM, prompts: list[list[int]], params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=7)


@pytest.fixture(scope="module")
def reference(tiny_llama: TinyCheckpoint, prompts) -> list[list[int]]:
    llm = make_llm(tiny_llama, num_kv_blocks=200)  # every request fits at once
    tokens, _ = run(llm, prompts)
    assert llm.engine.scheduler.num_preemptions == 0
    return tokens


@pytest.mark.parametrize("prefix_cache", ["none", "radix"])
@pytest.mark.parametrize("budget", [None, 8])
def test_small_pool_preempts_and_matches(tiny_llama, prompts, reference, budget,
                                         prefix_cache) -> None:
    # 16 blocks = 64 tokens: one request at full length fits, the batch (~8 x 40) does not.
    llm = make_llm(tiny_llama, num_kv_blocks=16, max_num_batched_tokens=budget,
                   prefix_cache=prefix_cache)
    tokens, outs = run(llm, prompts)
    assert tokens == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert not llm.engine.has_unfinished_requests()
    assert_no_leaks(llm.engine)


def test_seeded_sampling_survives_preemption(tiny_llama, prompts) -> None:
    """A preempted request recomputes its tokens but must not re-sample them: with
    per-request seeds, sampled outputs equal those of a run without preemption."""
    params = [SamplingParams(temperature=1.0, top_k=50, seed=100 + i, max_tokens=20,
                             ignore_eos=True) for i in range(len(prompts))]
    big = make_llm(tiny_llama, num_kv_blocks=200)
    ref, _ = run(big, prompts, params)
    small = make_llm(tiny_llama, num_kv_blocks=16)
    tokens, _ = run(small, prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert tokens == ref
    assert tokens != run(big, prompts, GREEDY)[0]  # really sampled, not greedy
    assert_no_leaks(small.engine)


def test_prompt_too_long_raises_and_engine_keeps_serving(tiny_llama, prompts, reference) -> None:
    llm = make_llm(tiny_llama, num_kv_blocks=200)
    engine = llm.engine
    assert engine.max_model_len == 64
    for n in (64, 100):  # the context must also hold one generated token
        with pytest.raises(PromptTooLongError, match="context"):
            engine.add_request(f"long{n}", [5] * n, GREEDY)
    with pytest.raises(PromptTooLongError):
        llm.generate({"prompt_token_ids": [5] * 200}, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    # The longest prompt that fits is served; max_tokens is clipped to the room left.
    out = llm.generate({"prompt_token_ids": [5] * 63}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert_no_leaks(llm.engine)


def test_failed_generate_leaves_no_orphans(tiny_llama, prompts, reference) -> None:
    """A batch with one bad prompt raises, and the good prompts queued before it are not
    left running in the engine."""
    llm = make_llm(tiny_llama, num_kv_blocks=200)
    batch = [{"prompt_token_ids": p} for p in prompts[:3]] + [{"prompt_token_ids": [5] * 80}]
    with pytest.raises(PromptTooLongError):
        llm.generate(batch, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert_no_leaks(llm.engine)
    tokens, _ = run(llm, prompts)
    assert tokens == reference


def test_invalid_prompts_rejected(tiny_llama) -> None:
    llm = make_llm(tiny_llama, num_kv_blocks=200)
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request("oov", [1, 256], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request("neg", [1, -1], GREEDY)
    llm.engine.add_request("ok", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("ok", [1, 2, 3], GREEDY)
    llm.engine.abort_request("ok")
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(tiny_llama, prompts, reference) -> None:
    llm = make_llm(tiny_llama, num_kv_blocks=200, max_num_seqs=4)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    for _ in range(3):
        engine.step()
    running = {r.request_id: len(r.block_ids) for r in engine.scheduler.running}
    waiting = [r.request_id for r in engine.scheduler.waiting]
    assert "1" in running and "6" in waiting  # max_num_seqs=4 holds the rest back
    # Blocks nothing uses: free, or kept by the prefix cache but evictable.
    def available() -> int:
        return engine.block_pool.num_free + engine.prefix_cache.num_evictable_blocks
    before = available()
    aborted = next(r for r in engine.scheduler.running if r.request_id == "1")
    out = engine.abort_request("1")
    assert out is not None and out.finished
    assert out.outputs[0].finish_reason == "abort"
    assert aborted.block_ids == [] and aborted not in engine.scheduler.running
    assert available() == before + running["1"]
    # Aborting a request that never ran takes it out of the queue.
    out = engine.abort_request("6")
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    assert "6" not in [r.request_id for r in engine.scheduler.waiting]
    assert engine.abort_request("no-such-request") is None
    # The others finish exactly as they would have.
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in ("1", "6")
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert sorted(results) == [str(i) for i in range(len(prompts)) if i not in (1, 6)]
    for rid, tokens in results.items():
        assert tokens == reference[int(rid)]
    assert_no_leaks(llm.engine)
    # Ids of finished and aborted requests can be reused.
    engine.add_request("1", prompts[1], GREEDY)
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].outputs[0].token_ids == reference[1]
    assert_no_leaks(llm.engine)


def test_abort_preempted_request(tiny_llama, prompts, reference) -> None:
    llm = make_llm(tiny_llama, num_kv_blocks=16)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    results = {}
    while engine.scheduler.num_preemptions == 0:
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    victim = next(r for r in engine.scheduler.waiting if r.num_preemptions > 0)
    out = engine.abort_request(victim.request_id)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].token_ids == reference[int(victim.request_id)][:len(out.outputs[0].token_ids)]
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert sorted(results) == sorted(str(i) for i in range(len(prompts)) if str(i) != victim.request_id)
    assert all(tokens == reference[int(rid)] for rid, tokens in results.items())
    assert_no_leaks(engine)
