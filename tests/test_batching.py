"""Continuous batching must not change results: a request gets the same greedy tokens
alone, inside a big mixed batch, under chunked prefill, and in steps that mix decodes
with prefill chunks."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from conftest import TinyCheckpoint, assert_no_leaks, random_prompts
from ember import LLM, SamplingParams
from ember.engine.engine import Engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
LENGTHS = [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24, 31, 33, 40, 47, 60]  # 16 requests


@dataclass
class StepRecord:
    """What one scheduled request did in one step, captured before the step ran."""
    request_id: str
    num_computed: int      # tokens with K/V before the step
    num_new: int           # tokens computed in the step
    num_prompt: int

    @property
    def is_decode(self) -> bool:
        return self.num_computed >= self.num_prompt and self.num_new == 1

    @property
    def is_prefill(self) -> bool:
        return self.num_computed < self.num_prompt


def record_steps(engine: Engine) -> list[list[StepRecord]]:
    """Wrap the scheduler so every step's schedule is kept for inspection."""
    steps: list[list[StepRecord]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule(*args, **kw):
        out = schedule(*args, **kw)
        if not out.empty:
            steps.append([StepRecord(s.request.request_id, s.request.num_computed_tokens,
                                     s.num_new_tokens, s.request.num_prompt_tokens)
                          for s in out.scheduled])
        return out
    engine.scheduler.schedule = recording_schedule
    return steps


def make_llm(ckpt: TinyCheckpoint, **kw) -> LLM:
    args = dict(num_kv_blocks=256, block_size=4, dtype="float32")
    args.update(kw)
    return LLM(ckpt.path, **args)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=3)


@pytest.fixture(scope="module")
def alone(tiny_llama: TinyCheckpoint, prompts) -> list[list[int]]:
    """Each prompt run on its own: the reference for every batched run."""
    llm = make_llm(tiny_llama)
    steps = record_steps(llm.engine)
    result = [run(llm, [p])[0] for p in prompts]
    assert all(len(s) == 1 for s in steps)  # really alone
    assert all(len(t) == GREEDY.max_tokens for t in result)
    return result


@pytest.mark.parametrize("engine_args", [{}, {"prefix_cache": "none", "scheduling_policy": "fcfs"}],
                         ids=["default", "no-cache-fcfs"])
def test_sixteen_mixed_requests_batched_equal_alone(tiny_llama, prompts, alone, engine_args) -> None:
    llm = make_llm(tiny_llama, **engine_args)
    steps = record_steps(llm.engine)
    assert run(llm, prompts) == alone
    # All 16 were admitted together and decoded together.
    assert len(steps[0]) == 16 and all(r.is_prefill for r in steps[0])
    assert max(sum(r.is_decode for r in step) for step in steps) == 16
    assert_no_leaks(llm.engine)


def test_chunked_prefill_equals_whole_prefill(tiny_llama, prompts, alone) -> None:
    llm = make_llm(tiny_llama, max_num_batched_tokens=8)
    steps = record_steps(llm.engine)
    assert run(llm, prompts) == alone
    assert all(sum(r.num_new for r in step) <= 8 for step in steps)
    # Every prompt longer than the budget was split, into chunks no larger than it.
    for rid, n_prompt in enumerate(LENGTHS):
        chunks = [r.num_new for step in steps for r in step
                  if r.request_id == str(rid) and r.is_prefill]
        assert sum(chunks) == n_prompt
        if n_prompt > 8:
            assert len(chunks) >= 2
    assert_no_leaks(llm.engine)


def test_steps_mixing_decodes_and_prefill_chunks(tiny_llama, prompts, alone) -> None:
    """A small budget and staggered arrivals force steps holding both decode tokens of
    running requests and prefill chunks of new ones; results must not change."""
    llm = make_llm(tiny_llama, max_num_batched_tokens=12)
    engine = llm.engine
    steps = record_steps(engine)
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:  # a new request arrives every step
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert [results[str(i)] for i in range(len(prompts))] == alone
    mixed = [s for s in steps if any(r.is_decode for r in s) and any(r.is_prefill for r in s)]
    assert mixed, "no step mixed decodes with prefill chunks"
    # Some mixed step carried a partial prefill chunk (the budget cut the prompt short).
    assert any(r.is_prefill and r.num_computed + r.num_new < r.num_prompt
               for s in mixed for r in s)
    assert all(sum(r.num_new for r in s) <= 12 for s in steps)
    assert_no_leaks(engine)


def test_batch_of_distinct_params(tiny_llama, prompts, alone) -> None:
    """Per-request max_tokens inside one batch: each stops at its own length, and the
    tokens it did produce are the prefix of its unbatched greedy output."""
    llm = make_llm(tiny_llama)
    params = [SamplingParams(temperature=0.0, max_tokens=1 + i % 16, ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outs, alone)):
        c = out.outputs[0]
        assert c.token_ids == ref[:1 + i % 16]
        assert c.finish_reason == "length"


def test_shared_prefixes_same_tokens_with_and_without_prefix_cache(tiny_llama) -> None:
    """Prompts sharing a 21-token prefix: served from the prefix cache (also mid-prefill,
    under a small budget) they give the tokens they get when every prompt is computed."""
    (prefix,) = random_prompts([21], seed=40)
    suffixes = random_prompts([2, 5, 9, 1, 14, 3], seed=41)
    prompts = [prefix + s[1:] for s in suffixes] + [prefix[:10], prefix]
    ref = run(make_llm(tiny_llama, prefix_cache="none"), prompts)
    for budget in (None, 8):
        llm = make_llm(tiny_llama, prefix_cache="radix", max_num_batched_tokens=budget)
        first = llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)[0]
        assert first.outputs[0].token_ids == ref[0] and first.num_cached_tokens == 0
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        # The shared prefix (5 full blocks of 4) came from the cache for the long prompts.
        assert all(o.num_cached_tokens >= 20 for o, p in zip(outs, prompts) if len(p) > 21)
        assert_no_leaks(llm.engine)
