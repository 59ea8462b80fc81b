"""Scheduler unit tests: no model, requests advanced by hand (or by a fake sampler)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from ember.cache.block_pool import BlockPool
from ember.cache.prefix import create_prefix_cache
from ember.engine.request import Request, RequestStatus
from ember.engine.scheduler import Scheduler, SchedulerOutput
from ember.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64,
         max_model_len: int = 256) -> Scheduler:
    return Scheduler(BlockPool(num_blocks), BS, max_num_seqs, budget, max_model_len)


def req(rid: str, n_prompt: int, max_tokens: int = 4) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(1, n_prompt + 1)), params, max_tokens)


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """One step with a fake model: every request that reaches its last token samples `token`."""
    out = sched.schedule()
    sched.update(out, {s.request.request_id: token for s in out.scheduled if s.samples})
    return out


def check_blocks(sched: Scheduler) -> None:
    """Every running request holds exactly the blocks its computed tokens need, and the
    pool's free count matches what requests hold."""
    held = 0
    for r in sched.running:
        assert len(r.block_ids) == -(-r.num_computed_tokens // BS)
        held += len(r.block_ids)
    for r in sched.waiting:
        assert r.block_ids == [] and r.num_computed_tokens == 0
    assert sched.block_pool.num_free == sched.block_pool.num_blocks - held


def test_token_budget_respected_and_last_request_chunked() -> None:
    sched = make(budget=20)
    for i, n in enumerate([8, 8, 8]):
        sched.add(req(str(i), n))
    out = sched.schedule()
    assert plan(out) == [("0", 8), ("1", 8), ("2", 4)]
    assert out.num_tokens == 20
    assert [s.samples for s in out.scheduled] == [True, True, False]


def test_max_num_seqs_respected() -> None:
    sched = make(max_num_seqs=2)
    for i in range(5):
        sched.add(req(str(i), 3))
    for _ in range(20):
        out = step(sched)
        assert len(out.scheduled) <= 2 and len(sched.running) <= 2
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()


def test_fcfs_order() -> None:
    sched = make(budget=10, max_num_seqs=8)
    reqs = [req(str(i), n) for i, n in enumerate([6, 3, 5, 2])]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    # Admitted in arrival order; the budget ran out inside request 2, request 3 waits even
    # though it alone would have fit.
    assert plan(out) == [("0", 6), ("1", 3), ("2", 1)]
    assert [r.request_id for r in sched.waiting] == ["3"]
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
    finished_order = []
    while sched.has_unfinished():
        out = step(sched)
        finished_order += [s.request.request_id for s in out.scheduled if s.request.finished]
    assert sorted(finished_order) == ["0", "1", "2", "3"]
    assert finished_order.index("0") < finished_order.index("3")


def test_decodes_scheduled_before_new_prefills() -> None:
    sched = make(budget=6)
    a, b = req("a", 3), req("b", 2)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled (5 tokens) and sampled a first token
    assert a.num_output_tokens == 1 and b.num_output_tokens == 1
    sched.add(req("c", 10))
    out = sched.schedule()
    # Running decodes first (1 token each), then the newcomer gets what budget is left.
    assert plan(out) == [("a", 1), ("b", 1), ("c", 4)]


def test_decodes_keep_going_when_budget_is_smaller_than_a_prompt() -> None:
    sched = make(budget=3)
    sched.add(req("a", 2, max_tokens=10))
    step(sched)
    sched.add(req("big", 12))
    for _ in range(4):
        out = step(sched)
        assert plan(out)[0] == ("a", 1)  # never starved by the long prefill
        assert out.num_tokens <= 3


def test_chunked_prefill_splits_and_samples_only_at_the_end() -> None:
    sched = make(budget=8)
    r = req("r", 20, max_tokens=2)
    sched.add(r)
    chunks = []
    while r.num_output_tokens == 0:
        out = step(sched)
        (s,) = out.scheduled
        chunks.append(s.num_new_tokens)
        check_blocks(sched)
    assert chunks == [8, 8, 4]
    assert r.num_computed_tokens == 20 and r.num_tokens == 21
    out = step(sched)
    assert plan(out) == [("r", 1)] and r.finished and r.finish_reason == "length"
    assert sched.block_pool.num_free == sched.block_pool.num_blocks


def test_blocks_grow_with_tokens() -> None:
    sched = make()
    r = req("r", 5, max_tokens=8)
    sched.add(r)
    step(sched)
    assert len(r.block_ids) == 2  # 5 tokens in blocks of 4
    for _ in range(3):
        step(sched)  # computes tokens 6, 7, 8
    assert len(r.block_ids) == 2
    step(sched)      # token 9 needs a third block
    assert len(r.block_ids) == 3
    check_blocks(sched)


def test_preemption_evicts_latest_admitted_and_requeues_it_first() -> None:
    # 6 blocks = 24 tokens: two 12-token prompts fill the pool exactly.
    sched = make(num_blocks=6, budget=64)
    a, b = req("a", 12, max_tokens=10), req("b", 12, max_tokens=10)
    sched.add(a)
    sched.add(b)
    sched.add(req("c", 2))
    step(sched)
    assert sched.block_pool.num_free == 0 and [r.request_id for r in sched.running] == ["a", "b"]
    out = step(sched)  # a needs a 4th block for its 13th token: b is evicted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert plan(out) == [("a", 1)]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.num_output_tokens == 1  # its sampled token is kept and recomputed later
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # ahead of newer requests
    check_blocks(sched)
    while sched.has_unfinished():
        step(sched)
        check_blocks(sched)
    assert a.finished and b.finished and a.num_output_tokens == b.num_output_tokens == 10
    assert sched.block_pool.num_free == 6


def test_finish_from_outside_releases_waiting_and_running() -> None:
    sched = make(max_num_seqs=1)
    a, b = req("a", 5), req("b", 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    sched.finish(b, "abort")  # idempotent
    assert a.finish_reason == b.finish_reason == "abort"
    assert not sched.has_unfinished() and sched.block_pool.num_free == sched.block_pool.num_blocks


def test_stop_token_and_eos() -> None:
    sched = make()
    eos = frozenset({99})
    r1 = Request("stop", [1, 2], SamplingParams(temperature=0, stop_token_ids=[7], max_tokens=9), 9, eos)
    r2 = Request("eos", [1, 2], SamplingParams(temperature=0, max_tokens=9), 9, eos)
    r3 = Request("ign", [1, 2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), 3, eos)
    r4 = Request("min", [1, 2], SamplingParams(temperature=0, max_tokens=9, min_tokens=2), 9, eos)
    for r in (r1, r2, r3, r4):
        sched.add(r)
    out = sched.schedule()
    sched.update(out, {"stop": 7, "eos": 99, "ign": 99, "min": 99})
    assert (r1.finish_reason, r1.stop_reason) == ("stop", 7)
    assert (r2.finish_reason, r2.stop_reason) == ("stop", None)
    assert not r3.finished and not r4.finished  # ignore_eos; min_tokens not reached
    out = sched.schedule()
    sched.update(out, {"ign": 99, "min": 99})
    assert r4.finish_reason == "stop" and r4.output_token_ids == [99, 99]
    out = sched.schedule()
    sched.update(out, {"ign": 99})
    assert r3.finish_reason == "length" and r3.output_token_ids == [99, 99, 99]


def test_context_length_ends_request() -> None:
    sched = make(max_model_len=12)
    r = Request("r", list(range(10)), SamplingParams(temperature=0, max_tokens=None), 100)
    sched.add(r)
    while sched.has_unfinished():
        step(sched)
    assert r.num_tokens == 12 and r.finish_reason == "length"


def check_references(sched: Scheduler) -> None:
    """Every block reference belongs to a running request or to the prefix cache (one each)."""
    pool = sched.block_pool
    assert sum(pool.ref_counts) == (sum(len(r.block_ids) for r in sched.running)
                                    + sched.prefix_cache.num_cached_blocks)
    assert pool.num_free == sum(1 for c in pool.ref_counts if c == 0)


@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 22), st.integers(1, 8)),
                        min_size=1, max_size=10),
       num_blocks=st.integers(10, 40), budget=st.integers(1, 40), max_num_seqs=st.integers(1, 6),
       cache=st.sampled_from(["none", "radix"]), policy=st.sampled_from(["fcfs", "lpm"]))
def test_random_workloads_finish_within_limits(prompts, num_blocks, budget, max_num_seqs,
                                               cache, policy) -> None:
    """Whatever the workload and limits (a pool big enough for any single request), every
    step respects the budget and the sequence cap, block references stay exact (with or
    without a prefix cache, prompts sharing prefixes), and every request finishes with
    exactly its max_tokens."""
    pool = BlockPool(num_blocks)
    sched = Scheduler(pool, BS, max_num_seqs, budget, 40, create_prefix_cache(cache, pool, BS),
                      policy)
    # Prompts start with one of three 8-token prefixes, so the cache has something to share.
    reqs = [Request(str(i), [100 + p] * 8 + list(range(1, n + 1)),
                    SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True), m)
            for i, (p, n, m) in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        out = step(sched)
        assert out.num_tokens <= budget and len(sched.running) <= max_num_seqs
        assert not out.empty  # never stalls while work remains
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        for r in sched.running:
            assert len(r.block_ids) == -(-r.num_computed_tokens // BS)
        check_references(sched)
    assert not sched.has_unfinished()
    assert all(r.finished and r.num_output_tokens == r.max_tokens for r in reqs)
    sched.prefix_cache.reset()
    assert pool.num_free == num_blocks
