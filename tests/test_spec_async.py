"""Speculative decoding under async scheduling: steps whose k is 0 run ahead (deferred),
steps that draft first apply the step in flight and run synchronously. Outputs must equal
plain decoding's (greedy) and synchronous speculation's (seeded sampling, same steps); the
hidden-state hook of a deferred step reads nothing back; no block leaks, with preemption,
aborts and the prefix cache."""
from __future__ import annotations

import os

import pytest
import torch
from _spec_helpers import force_k, random_mtp_tensors
from conftest import TinyCheckpoint, assert_no_leaks, random_prompts
from test_async_scheduling import mixed_params, run_aborting_in_flight
from test_async_scheduling import run as run_detailed
from test_eagle_proposer import _random_drafter_for

from ember import LLM, SamplingParams
from ember.config import ModelConfig, resolve_async_scheduling
from ember.spec.mtp import save_mtp_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LENGTHS = [3, 5, 9, 14, 20, 27, 33, 40]
PATTERN = [0, 0, 3, 0, 2, 2, 0, 0, 0, 1]   # k per engine step, cycled
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def make_llm(ckpt: TinyCheckpoint, mode: str = "off", **kw) -> LLM:
    args = {"num_kv_blocks": 256, "block_size": 4, "dtype": "float32", "max_model_len": 128,
            "async_scheduling": mode}
    args.update(kw)
    return LLM(ckpt.path, **args)


def run(llm: LLM, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [o.outputs[0].token_ids for o in outs]


def record_launches(llm: LLM) -> list[dict]:
    """Per launched step: its planned k, whether a step was in flight when it launched,
    how many requests drafted, and whether it was deferred."""
    seen: list[dict] = []
    runner = llm.engine.runner
    launch = runner.launch

    def recording(batch, previous=None, defer=False):
        step = launch(batch, previous, defer)
        seen.append({"k": batch.spec_k, "in_flight": previous is not None, "deferred": step.deferred,
                     "drafted": sum(1 for s in batch.scheduled if s.spec_token_ids)})
        return step
    runner.launch = recording
    return seen


def record_drafts(llm: LLM) -> list[tuple]:
    """(request id, its length then, the drafts) of every request that drafts."""
    made: list[tuple] = []
    proposer = llm.engine.speculator.proposer
    propose = proposer.propose

    def recording(batch):
        propose(batch)
        made.extend((s.request.request_id, s.request.num_tokens, tuple(s.spec_token_ids))
                    for s in batch.scheduled if s.spec_token_ids)
    proposer.propose = recording
    return made


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    base = random_prompts(LENGTHS, seed=5)
    return [p + p[1:] for p in base]   # repeated tails: n-gram lookup drafts from the start


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> list[list[int]]:
    return run(make_llm(tiny_llama), prompts)


@pytest.fixture(scope="module")
def learned(tiny_llama, tmp_path_factory) -> dict[str, dict]:
    """Configs of the proposers with a network: an MTP layer and an EAGLE-3 drafter (aux
    hidden rows) drafting trees, both random; the target as its own draft model."""
    root = tmp_path_factory.mktemp("learned")
    config = ModelConfig.from_file(os.path.join(tiny_llama.path, "config.json"))
    save_mtp_checkpoint(str(root / "mtp"), random_mtp_tensors(tiny_llama, seed=7), config)
    eagle = _random_drafter_for(config, str(root / "eagle"), draft_vocab=64)
    return {"mtp": {"method": "mtp", "num_speculative_tokens": 3, "model": str(root / "mtp")},
            "eagle-tree": {"method": "eagle", "num_speculative_tokens": 3, "model": eagle,
                           "tree": {"top_k": 2, "budget": 6}},
            "self-draft": {"method": "draft", "num_speculative_tokens": 3, "model": tiny_llama.path}}


def spec_config(method: str, learned: dict[str, dict]) -> dict:
    return NGRAM if method == "ngram" else learned[method]


# ---- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("engine_args", [{}, {"num_kv_blocks": 40, "prefix_cache": "radix"},
                                         {"num_kv_blocks": 40, "prefix_cache": "none"},
                                         {"max_num_seqs": 3, "max_num_batched_tokens": 16}],
                         ids=["roomy", "preempt-radix", "preempt-no-cache", "few-seqs-chunked"])
@pytest.mark.parametrize("method", ["ngram", "mtp", "eagle-tree", "self-draft"])
def test_greedy_equals_plain_decoding(tiny_llama, prompts, reference, learned, method,
                                      engine_args) -> None:
    """k alternates between 0 and k > 0 step by step: the k = 0 steps run ahead, the others
    drain the step in flight and draft; the output is plain decoding's, every block comes
    back."""
    llm = make_llm(tiny_llama, "on", speculative_config=spec_config(method, learned), **engine_args)
    assert llm.engine.async_scheduling
    force_k(llm, PATTERN)
    launches = record_launches(llm)
    assert run(llm, prompts) == reference
    assert sum(s["drafted"] for s in launches) >= 20   # requests that drafted, over all steps
    assert sum(s["deferred"] and s["in_flight"] for s in launches) >= 3   # ran ahead
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    stats = llm.engine.spec_stats()
    if method == "ngram":   # (random learned proposers' drafts are rejected)
        assert stats["num_accepted_tokens"] > 0
    if method == "self-draft":   # any draft K/V wrongly believed valid would be rejected
        assert stats["acceptance_rate"] == 1.0 and stats["num_accepted_tokens"] > 0
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_seeded_sampling_equals_sync_speculation(tiny_llama, prompts, learned, method) -> None:
    """Seeded sampling with the same k on the same steps (every request admitted at once,
    ends by length only, so async and sync run the same steps): async speculation draws
    exactly what synchronous speculation draws; MTP drafts from the same hidden rows."""
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=20, ignore_eos=True)
              for i in range(len(prompts))]
    outs, drafts = [], []
    for mode in ("off", "on"):
        llm = make_llm(tiny_llama, mode, speculative_config=spec_config(method, learned))
        force_k(llm, PATTERN)
        drafts.append(record_drafts(llm))
        outs.append(run(llm, prompts, params))
        assert_no_leaks(llm.engine)
    assert outs[0] == outs[1]
    assert drafts[0] == drafts[1] and len(drafts[0]) >= 5


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_mixed_requests_equal_sync_speculation(tiny_llama, prompts, reference, learned, method) -> None:
    """Greedy, seeded, a stop token, max_tokens 1, penalties with min_tokens (steps that
    run synchronously), logprobs, side by side: tokens, finish reasons and logprobs equal
    synchronous speculation's with the same k on each step."""
    params = mixed_params(len(prompts), stop_token=reference[2][4])
    outs = []
    for mode in ("off", "on"):
        llm = make_llm(tiny_llama, mode, speculative_config=spec_config(method, learned))
        force_k(llm, PATTERN)
        outs.append(run_detailed(llm, prompts, params))
        assert_no_leaks(llm.engine)
    assert outs[0] == outs[1]
    assert outs[1][2][1] == "stop"   # the stop token fired


def test_adaptive_controller_under_async(tiny_llama, prompts, reference) -> None:
    """The real controller (timing steps under async scheduling): output unchanged, plain
    steps timed, no leaks."""
    llm = make_llm(tiny_llama, "on", speculative_config=NGRAM, max_num_seqs=4)
    assert run(llm, prompts) == reference
    assert llm.engine.speculator.controller.target.has_data
    assert_no_leaks(llm.engine)


def test_abort_while_a_plain_step_is_in_flight(tiny_llama, prompts, reference) -> None:
    """Aborting a request while a k = 0 step runs ahead drops its late tokens; the next
    drafting step drains the step in flight without it; the others are unaffected."""
    llm = make_llm(tiny_llama, "on", speculative_config=NGRAM)
    force_k(llm, [0, 0, 0, 2])
    eng = llm.engine
    finals = run_aborting_in_flight(eng, prompts[:3], GREEDY, abort_id="1", after_steps=6)
    assert finals["0"] == reference[0] and finals["2"] == reference[2] and "1" not in finals
    assert_no_leaks(eng)


# ---- what runs ahead and what drains --------------------------------------------------------
def test_plain_steps_run_ahead_and_drafting_steps_drain(tiny_llama, prompts) -> None:
    llm = make_llm(tiny_llama, "on", speculative_config=NGRAM)
    force_k(llm, [0, 0, 0, 3])
    launches = record_launches(llm)
    run(llm, prompts)
    plain = [s for s in launches[1:] if s["k"] == 0]   # decode steps, after the prefill
    # Every k = 0 decode step is deferred; those after another k = 0 step run ahead of it.
    assert all(s["deferred"] for s in plain) and sum(s["in_flight"] for s in plain) >= len(plain) // 2
    # A k > 0 step never launches with a step in flight, although the step before it was
    # deferred: that one was applied first. A step that drafted is resolved at once.
    spec = [(launches[i - 1], s) for i, s in enumerate(launches) if i > 1 and s["k"] > 0]
    assert len(spec) >= 5 and not any(s["in_flight"] for _, s in spec)
    assert all(before["deferred"] for before, _ in spec)
    assert all(not s["deferred"] for _, s in spec if s["drafted"])
    assert sum(s["drafted"] for _, s in spec) >= 20


class NoHostReads(torch.Tensor):
    """A tensor that fails on every call that reads its values on the host (on a GPU each
    would wait for the device): what a hook on a deferred step must not do."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
             torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__index__, torch.Tensor.__array__, torch.Tensor.nonzero,
             torch.Tensor.unique, torch.Tensor.masked_select, torch.nonzero, torch.unique,
             torch.masked_select}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS or (func is torch.Tensor.to and any(
                isinstance(a, (str, torch.device)) for a in list(args[1:]) + list((kwargs or {}).values()))):
            raise AssertionError(f"host read in the hidden-state hook: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs)


def guard_hook(llm: LLM) -> list[bool]:
    """Run the hook on NoHostReads views of what it is handed; record, per call, whether a
    step was in flight (the step being launched runs ahead of it)."""
    runner, eng = llm.engine.runner, llm.engine
    hook = runner.hidden_states_hook
    calls: list[bool] = []

    def guarded(step):
        for name in ("hidden", "slot_mapping", "aux_hidden"):
            t = getattr(step, name)
            if t is not None:
                setattr(step, name, t.as_subclass(NoHostReads))
        calls.append(eng.in_flight is not None)
        hook(step)
    runner.hidden_states_hook = guarded
    return calls


def test_the_guard_catches_host_reads() -> None:
    t = torch.arange(4).as_subclass(NoHostReads)
    for read in (lambda: t.tolist(), lambda: t[0].item(), lambda: t.cpu(), lambda: bool(t[0]),
                 lambda: t.to("cpu"), lambda: int(t[1]), lambda: t.nonzero()):
        with pytest.raises(AssertionError, match="host read"):
            read()
    assert torch.equal((t + 1).as_subclass(torch.Tensor), torch.arange(1, 5))   # device work passes


@pytest.mark.parametrize("method", ["mtp", "eagle-tree"])
def test_hook_on_deferred_steps_reads_nothing_back(tiny_llama, prompts, reference, learned, method) -> None:
    """The proposer's hook runs at the launch of deferred steps, while the step before is
    still in flight, on views that fail on any host read; the drafts that follow read the
    rows it kept, and equal the drafts made without async scheduling (the same steps run)."""
    drafts = []
    for mode in ("off", "on"):
        llm = make_llm(tiny_llama, mode, speculative_config=learned[method])
        force_k(llm, PATTERN)
        calls = guard_hook(llm)
        launches = record_launches(llm)
        drafts.append(record_drafts(llm))
        assert run(llm, prompts) == reference
        assert len(calls) == len(launches)
        assert_no_leaks(llm.engine)
    assert sum(calls) >= 5 and sum(s["deferred"] for s in launches) >= 10
    assert drafts[0] == drafts[1] and len(drafts[0]) >= 20


def test_a_hook_that_reads_back_fails_the_guard(tiny_llama, prompts, learned) -> None:
    """The check above can fail: a hook reading the slots on the host trips it."""
    llm = make_llm(tiny_llama, "on", speculative_config=learned["mtp"])
    force_k(llm, [0])
    llm.engine.runner.hidden_states_hook = lambda step: step.slot_mapping.tolist()
    guard_hook(llm)
    with pytest.raises(AssertionError, match="host read"):
        run(llm, prompts[:2])


# ---- configuration --------------------------------------------------------------------------
def test_async_scheduling_with_speculation_config(tiny_llama) -> None:
    assert resolve_async_scheduling("auto", torch.device("cuda"))
    assert not resolve_async_scheduling("auto", torch.device("cpu"))
    assert resolve_async_scheduling("on", torch.device("cpu"))
    assert not resolve_async_scheduling("off", torch.device("cuda"))
    assert not make_llm(tiny_llama, "auto", speculative_config=NGRAM).engine.async_scheduling
    llm = make_llm(tiny_llama, "on", speculative_config=NGRAM)
    assert llm.engine.async_scheduling and llm.engine.speculator.controller.retime_steps == 3
    sync = make_llm(tiny_llama, "off", speculative_config=NGRAM)
    assert sync.engine.speculator.controller.retime_steps == 1
