"""Async scheduling: step N + 1 is scheduled and launched before step N's tokens reach the
host. Outputs must equal synchronous scheduling's exactly (greedy and seeded sampling,
stops, preemption, aborts), every block must come back, and steps must really overlap."""
from __future__ import annotations

import pytest

from conftest import TinyCheckpoint, assert_no_leaks, random_prompts
from ember import LLM, SamplingParams
from ember.engine.model_runner import LaunchedStep

LENGTHS = [9, 14, 21, 27, 30, 6, 18, 25, 11, 3]


def make_llm(ckpt: TinyCheckpoint, mode: str, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 200)
    return LLM(ckpt.path, block_size=4, dtype="float32", max_model_len=64,
               async_scheduling=mode, **kw)


def mixed_params(n: int, stop_token: int | None = None) -> list[SamplingParams]:
    """Greedy, seeded random, a stop token, short max_tokens, and requests that make a
    step synchronous (penalties, logprobs, min_tokens) side by side."""
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        elif kind == 1:
            p = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=10 + i, max_tokens=17,
                               ignore_eos=True)
        elif kind == 2:
            p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                               stop_token_ids=[stop_token] if stop_token is not None else None)
        elif kind == 3:
            p = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        elif kind == 4:
            p = SamplingParams(temperature=0.7, seed=3 + i, repetition_penalty=1.3,
                               frequency_penalty=0.5, max_tokens=12, ignore_eos=True, min_tokens=4)
        else:
            p = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2)
        out.append(p)
    return out


def run(llm: LLM, prompts: list[list[int]], params) -> list[tuple]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
             None if o.outputs[0].logprobs is None else
             [{t: round(lp.logprob, 4) for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]


def record_overlap(llm: LLM, monkeypatch) -> list[str]:
    """Log launches and resolves in the order they happen."""
    events: list[str] = []
    runner = llm.engine.runner
    launch, resolve = runner.launch, LaunchedStep.resolve

    def launching(batch, previous=None, defer=False):
        step = launch(batch, previous, defer)
        events.append("launch-deferred" if step.deferred else "launch-sync")
        return step

    def resolving(self):
        events.append("resolve")
        return resolve(self)
    monkeypatch.setattr(runner, "launch", launching)
    monkeypatch.setattr(LaunchedStep, "resolve", resolving)
    return events


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=11)


@pytest.fixture(scope="module")
def stop_token(tiny_llama, prompts) -> int:
    """A token the greedy continuation of prompt 2 produces early, so its stop id fires."""
    llm = make_llm(tiny_llama, "off")
    out = llm.generate([{"prompt_token_ids": prompts[2]}],
                       SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids[4]


@pytest.mark.parametrize("max_num_seqs", [3, 16])
def test_async_equals_sync(tiny_llama, prompts, stop_token, max_num_seqs) -> None:
    params = mixed_params(len(prompts), stop_token)
    ref = run(make_llm(tiny_llama, "off", max_num_seqs=max_num_seqs), prompts, params)
    llm = make_llm(tiny_llama, "on", max_num_seqs=max_num_seqs)
    assert llm.engine.async_scheduling
    assert run(llm, prompts, params) == ref
    assert ref[2][1] == "stop" and ref[2][2] == stop_token   # the stop really fired
    assert_no_leaks(llm.engine)


def test_steps_overlap_only_when_they_may(tiny_llama, prompts, monkeypatch) -> None:
    """History-free requests: every decode step is launched before the previous one is
    resolved. A penalty request's steps run synchronously."""
    llm = make_llm(tiny_llama, "on")
    events = record_overlap(llm, monkeypatch)
    run(llm, prompts[:4], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    deferred = events.count("launch-deferred")
    assert deferred >= 12 and "launch-sync" not in events
    # Step N is resolved after step N + 1 was launched: two steps outstanding at a resolve.
    outstanding, overlapped = 0, 0
    for e in events:
        outstanding += 1 if e.startswith("launch") else -1
        overlapped += e == "resolve" and outstanding >= 1
    assert overlapped >= deferred - 2
    events.clear()
    run(llm, prompts[:2], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                          repetition_penalty=1.2))
    assert "launch-deferred" not in events and events.count("launch-sync") >= 6
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("prefix_cache", ["none", "radix"])
def test_async_preemption_matches(tiny_llama, prompts, prefix_cache) -> None:
    """A pool too small for the batch: requests are preempted while their step is in
    flight, and still give the tokens of a run with room to spare."""
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=20,
                             ignore_eos=True) for i in range(len(prompts))]
    ref = run(make_llm(tiny_llama, "off"), prompts, params)
    llm = make_llm(tiny_llama, "on", num_kv_blocks=16, prefix_cache=prefix_cache)
    assert run(llm, prompts, params) == ref
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


def run_aborting_in_flight(eng, prompts: list[list[int]], params: SamplingParams, abort_id: str,
                           after_steps: int) -> dict[str, list[int]]:
    """Run prompts (request ids "0", "1", ...) to the end, aborting `abort_id` after
    `after_steps` steps, when a deferred step must be in flight; returns the finished
    requests' token ids."""
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    finals: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == after_steps:
            assert eng.in_flight is not None and eng.in_flight.deferred
            aborted = eng.abort_request(abort_id)
            assert aborted is not None and aborted.outputs[0].finish_reason == "abort"
    return finals


def test_abort_while_in_flight(tiny_llama, prompts) -> None:
    """Aborting a request whose step is in flight drops its late tokens; the others are
    unaffected and every block comes back."""
    greedy = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
    ref = run(make_llm(tiny_llama, "off"), prompts[:3], greedy)
    eng = make_llm(tiny_llama, "on").engine
    finals = run_aborting_in_flight(eng, prompts[:3], greedy, abort_id="1", after_steps=4)
    assert finals["0"] == ref[0][0] and finals["2"] == ref[2][0]
    assert "1" not in finals
    assert_no_leaks(eng)


def test_async_scheduling_config(tiny_llama) -> None:
    assert not make_llm(tiny_llama, "auto").engine.async_scheduling   # CPU: nothing to overlap
    # With speculation, steps without drafts run ahead (tests/test_spec_async.py).
    spec = make_llm(tiny_llama, "on", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert spec.engine.async_scheduling
    with pytest.raises(ValueError, match="async_scheduling"):
        make_llm(tiny_llama, "sometimes")
