"""Prefix cache (RadixAttention): the radix tree against a naive model (hypothesis), the
scheduler's use of it (matching, eviction before preemption, cache-aware order), and end to
end: greedy outputs are the same with the cache on and off, on a tiny random Llama with a
pool small enough to evict mid-run and on the real SmolLM2 with shared system prompts."""
from __future__ import annotations

import random

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import BOS, VOCAB, TinyCheckpoint, assert_no_leaks
from ember import LLM, SamplingParams
from ember.cache.block_pool import BlockPool
from ember.cache.prefix import NoPrefixCache
from ember.cache.radix import RadixPrefixCache
from ember.engine.request import Request
from ember.engine.scheduler import LPM_MAX_OVERTAKES, LPM_MAX_WAITING, Scheduler


# ---- the tree against a naive model ------------------------------------------------------
def tree_contents(cache: RadixPrefixCache) -> dict[tuple[int, ...], int]:
    """Every cached block as {the tokens up to and including it: its block id}; checks the
    tree's shape on the way (whole-block edges, children keyed by their first block)."""
    bs, out = cache.block_size, {}
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for key, child in node.children.items():
            assert child.parent is node and len(child.tokens) == bs * len(child.block_ids) > 0
            assert key == tuple(child.tokens[:bs])
            assert 0 <= child.lock_ref <= node.lock_ref or node is cache.root
            p = prefix
            for j, b in enumerate(child.block_ids):
                p = p + tuple(child.tokens[j * bs:(j + 1) * bs])
                out[p] = b
            stack.append((child, p))
    return out


class _SimRequest:
    def __init__(self, tokens: list[int], blocks: list[int], computed: int, locked: tuple, handle):
        self.tokens, self.blocks, self.computed = tokens, blocks, computed
        self.locked, self.handle = locked, handle   # the locked path, as tokens


class RadixMachine(RuleBasedStateMachine):
    """Requests match, compute, cache and finish against a small pool; every block is
    accounted for after every step. The model: a prefix-closed dict {block prefix: [block
    id, last use]}, evicting the least recently used unlocked leaf entry one block at a time."""

    BS, NUM_BLOCKS = 2, 24

    @initialize()
    def setup(self) -> None:
        self.pool = BlockPool(self.NUM_BLOCKS)
        self.cache = RadixPrefixCache(self.pool, self.BS)
        self.model: dict[tuple[int, ...], list[int]] = {}
        self.clock = 0
        self.reqs: list[_SimRequest] = []

    # -- model helpers --
    def _prefixes(self, tokens: list[int]) -> list[tuple[int, ...]]:
        return [tuple(tokens[:k]) for k in range(self.BS, len(tokens) + 1, self.BS)]

    def _model_match(self, tokens: list[int]) -> list[tuple[int, ...]]:
        hit = []
        for p in self._prefixes(tokens):
            if p not in self.model:
                break
            hit.append(p)
        return hit

    def _locked(self, p: tuple[int, ...]) -> bool:
        return any(r.locked[:len(p)] == p and len(r.locked) >= len(p) for r in self.reqs)

    def _model_evict(self, n: int) -> int:
        dropped = 0
        while dropped < n:
            leaves = [p for p in self.model
                      if not self._locked(p) and not any(len(q) == len(p) + self.BS and q[:len(p)] == p
                                                         for q in self.model)]
            if not leaves:
                break
            ticks = sorted(self.model[p][1] for p in leaves)
            assert len(ticks) < 2 or ticks[0] < ticks[1], "LRU ties are impossible in the tree"
            victim = min(leaves, key=lambda p: self.model[p][1])
            del self.model[victim]
            dropped += 1
        return dropped

    # -- rules --
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=12), drop=st.integers(0, 3))
    def admit(self, tokens: list[int], drop: int) -> None:
        """match, share, allocate the rest (evicting if it must): the scheduler's admission."""
        m = self.cache.match(tokens[:-1])   # the last token is always computed
        self.clock += 1
        expect = self._model_match(tokens[:-1])
        assert m.block_ids == [self.model[p][0] for p in expect]
        assert m.num_tokens == len(expect) * self.BS
        for p in expect:
            self.model[p][1] = self.clock
        self.pool.share(m.block_ids)
        req = _SimRequest(tokens, list(m.block_ids), max(m.num_tokens, len(tokens) - drop),
                          tuple(tokens[:m.num_tokens]), m.handle)
        self.reqs.append(req)
        need = -(-len(tokens) // self.BS) - len(req.blocks)
        short = need - self.pool.num_free
        if short > 0:
            if short > self.cache.num_evictable_blocks:
                self._finish(req, insert=False)   # does not fit: gives back what it took
                return
            assert self.cache.evict(short) == short == self._model_evict(short)
        req.blocks += self.pool.allocate(need)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 7))
    def cache_running(self, i: int) -> None:
        """The scheduler after a prefill chunk: insert, move the lock, adopt the cache's blocks."""
        req = self.reqs[i % len(self.reqs)]
        n = req.computed
        m = self.cache.insert(req.tokens[:n], req.blocks[:n // self.BS])
        self._model_insert(req, n)
        assert m.block_ids == [self.model[p][0] for p in self._prefixes(req.tokens[:n])]
        self.cache.lock(m.handle)
        self.cache.unlock(req.handle)
        req.handle, req.locked = m.handle, tuple(req.tokens[:m.num_tokens])
        for j, b in enumerate(m.block_ids):
            if req.blocks[j] != b:
                self.pool.share([b])
                self.pool.free([req.blocks[j]])
                req.blocks[j] = b

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 7))
    def finish(self, i: int) -> None:
        self._finish(self.reqs[i % len(self.reqs)], insert=True)

    def _finish(self, req: _SimRequest, insert: bool) -> None:
        if insert:
            self.cache.insert(req.tokens[:req.computed], req.blocks[:req.computed // self.BS])
            self._model_insert(req, req.computed)
        self.cache.unlock(req.handle)
        self.reqs.remove(req)
        self.pool.free(req.blocks)

    def _model_insert(self, req: _SimRequest, n: int) -> None:
        self.clock += 1
        for j, p in enumerate(self._prefixes(req.tokens[:n])):
            self.model.setdefault(p, [req.blocks[j], 0])[1] = self.clock

    @rule(n=st.integers(0, 30))
    def evict(self, n: int) -> None:
        expect = min(n, self.cache.num_evictable_blocks)
        assert self.cache.evict(n) == expect == self._model_evict(n)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=0, max_size=12))
    def match_length(self, tokens: list[int]) -> None:
        before = tree_contents(self.cache)
        assert self.cache.match_length(tokens) == len(self._model_match(tokens)) * self.BS
        assert tree_contents(self.cache) == before

    @rule()
    def finish_all_then_reset(self) -> None:
        for req in list(self.reqs):
            self._finish(req, insert=True)
        # Nothing leaks: every block is free or held by the cache alone, and all of it evictable.
        assert self.pool.num_free + self.cache.num_cached_blocks == self.NUM_BLOCKS
        assert self.cache.num_evictable_blocks == self.cache.num_cached_blocks
        n = self.cache.num_cached_blocks
        assert self.cache.reset() == n == self._model_evict(n)
        assert self.pool.num_free == self.NUM_BLOCKS

    # -- invariants --
    @invariant()
    def tree_equals_model(self) -> None:
        assert tree_contents(self.cache) == {p: v[0] for p, v in self.model.items()}
        assert self.cache.num_cached_blocks == len(self.model)
        assert self.cache.num_evictable_blocks == sum(not self._locked(p) for p in self.model)
        assert self.cache.stats().cached_tokens == len(self.model) * self.BS

    @invariant()
    def every_block_accounted_for(self) -> None:
        tree_blocks = [v[0] for v in self.model.values()]
        assert len(set(tree_blocks)) == len(tree_blocks)
        for b in range(self.NUM_BLOCKS):
            holders = tree_blocks.count(b) + sum(r.blocks.count(b) for r in self.reqs)
            assert self.pool.ref_counts[b] == holders
        assert self.pool.num_free == self.pool.ref_counts.count(0)


TestRadixTree = RadixMachine.TestCase
TestRadixTree.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_partial_blocks_are_not_cached_and_splits_fall_on_block_boundaries() -> None:
    pool = BlockPool(8)
    cache = RadixPrefixCache(pool, 4)
    blocks = pool.allocate(3)
    cache.insert(list(range(11)), blocks)        # 2 full blocks + 3 tokens: the 3 are not cached
    assert cache.num_cached_blocks == 2 and [pool.ref_counts[b] for b in blocks] == [2, 2, 1]
    pool.free(blocks[1:])                        # we keep block 0, as a running request would
    m = cache.match(list(range(8)) + [99])
    assert (m.block_ids, m.num_tokens) == (blocks[:2], 8)
    cache.unlock(m.handle)
    m = cache.match([0, 1, 2, 3, 4, 5, 6, 99])  # differs inside block 2: only block 1 matches
    assert (m.block_ids, m.num_tokens) == (blocks[:1], 4)
    assert len(cache.root.children) == 1 and len(cache.root.children[(0, 1, 2, 3)].children) == 1
    # The split node carries the lock: evicting everything leaves the locked first block.
    assert cache.evict(8) == 1 and tree_contents(cache) == {(0, 1, 2, 3): blocks[0]}
    cache.unlock(m.handle)
    with pytest.raises(ValueError):
        cache.unlock(m.handle)
    # A block held by the cache and by us is freed only when both have let go.
    assert cache.reset() == 0 and pool.ref_counts[blocks[0]] == 1 and cache.num_cached_blocks == 0
    pool.free(blocks[:1])
    assert pool.num_free == 8


def test_eviction_is_lru_and_trims_leaves_from_the_end() -> None:
    pool = BlockPool(16)
    cache = RadixPrefixCache(pool, 2)
    a, b = pool.allocate(3), pool.allocate(3)
    cache.insert([1, 1, 2, 2, 3, 3], a)
    cache.insert([5, 5, 6, 6, 7, 7], b)
    pool.free(a + b)                               # the cache's references are the last ones
    cache.unlock(cache.match([1, 1, 2, 2, 3, 3, 0]).handle)  # a is now the more recent
    assert cache.evict(2) == 2                     # from the end of b, the older leaf
    assert cache.match_length([5, 5, 6, 6, 7, 7]) == 2
    assert cache.match_length([1, 1, 2, 2, 3, 3]) == 6
    assert cache.evict(2) == 2                     # b's last block, then a's tail
    assert cache.match_length([5, 5]) == 0 and cache.match_length([1, 1, 2, 2, 3, 3]) == 4
    s = cache.stats()
    assert (s.evicted_blocks, s.cached_blocks, s.evictable_blocks) == (4, 2, 2)
    assert pool.num_free == 14


# ---- the scheduler ------------------------------------------------------------------------
BS = 4


def make_sched(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8,
               policy: str = "lpm") -> Scheduler:
    pool = BlockPool(num_blocks)
    return Scheduler(pool, BS, max_num_seqs, budget, 256, RadixPrefixCache(pool, BS), policy)


def req(rid: str, prompt: list[int], max_tokens: int = 4, **kw) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
    return Request(rid, list(prompt), params, max_tokens)


def run_until_done(sched: Scheduler, token: int = 7) -> list[str]:
    """Steps with a fake model until every request ends; returns the order of admission."""
    order: list[str] = []
    for _ in range(1000):
        if not sched.has_unfinished():
            return order
        out = sched.schedule()
        order += [s.request.request_id for s in out.scheduled if s.request.request_id not in order]
        sched.update(out, {s.request.request_id: token for s in out.scheduled if s.samples})
    raise AssertionError("the scheduler stopped making progress")


def test_admission_shares_the_cached_prefix_and_computes_the_rest() -> None:
    sched = make_sched()
    first = req("a", range(1, 11))                # 10 prompt tokens + 4 sampled 7s
    sched.add(first)
    run_until_done(sched)
    # 13 tokens were computed (not the last sample): 3 full blocks are cached.
    assert sched.prefix_cache.num_cached_blocks == 3
    second = req("b", list(range(1, 11)) + [7, 99])  # agrees for 11 tokens: 2 whole blocks
    sched.add(second)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 4)]
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    shared = second.block_ids[:2]
    assert all(sched.block_pool.ref_counts[b] == 2 for b in shared)
    assert sched.prefix_cache.num_evictable_blocks == 1      # b's path is locked
    # A prompt the cache holds whole (a's first 12 tokens): all but its last token may come
    # from the cache, in whole blocks: 8.
    third = req("c", list(range(1, 11)) + [7, 7])
    sched.add(third)
    sched.update(out, {"b": 7})
    out = sched.schedule()
    assert third.num_computed_tokens == 8 and ("c", 4) in [(s.request.request_id, s.num_new_tokens)
                                                           for s in out.scheduled]
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
    run_until_done(sched)
    stats = sched.prefix_cache.stats()
    assert (stats.prompt_tokens, stats.cached_prompt_tokens) == (10 + 12 + 12, 16)
    assert sched.block_pool.num_free + stats.cached_blocks == 64 and stats.evictable_blocks == stats.cached_blocks


def test_prompt_logprobs_requests_compute_their_whole_prompt() -> None:
    sched = make_sched()
    sched.add(req("a", range(1, 13)))
    run_until_done(sched)
    r = req("b", range(1, 13), prompt_logprobs=1)
    sched.add(r)
    sched.schedule()
    assert r.num_computed_tokens == 0 and r.num_cached_tokens == 0


def test_cache_is_evicted_before_anyone_is_preempted() -> None:
    sched = make_sched(num_blocks=24, budget=256)
    for i in range(4):                             # fill the cache: 4 x 4 blocks
        sched.add(req(str(i), [100 + i] * 16, max_tokens=1))
    run_until_done(sched)
    assert sched.prefix_cache.num_cached_blocks == 16 and sched.block_pool.num_free == 8
    # Both fit at admission (4 blocks each) but grow to 7 blocks each: without eviction one
    # of them would be preempted.
    for i in range(2):
        sched.add(req(f"n{i}", [200 + i] * 14, max_tokens=12))
    out = sched.schedule()
    assert len(out.scheduled) == 2
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled})
    run_until_done(sched)
    assert sched.num_preemptions == 0
    assert sched.prefix_cache.stats().evicted_blocks == 14 - 8


def test_lpm_admits_longest_cached_prefix_first_and_fcfs_does_not() -> None:
    for policy, expect in (("lpm", ["hit", "miss"]), ("fcfs", ["miss", "hit"])):
        sched = make_sched(policy=policy, max_num_seqs=1)
        sched.add(req("warm", range(1, 21), max_tokens=1))
        run_until_done(sched)
        sched.add(req("miss", range(50, 70), max_tokens=1))
        sched.add(req("hit", list(range(1, 21)) + [5], max_tokens=1))
        assert run_until_done(sched) == expect, policy


def test_a_burst_sharing_a_prefix_computes_it_once_under_lpm() -> None:
    for policy in ("lpm", "fcfs"):
        sched = make_sched(policy=policy, budget=256)
        for i in range(4):
            sched.add(req(f"r{i}", list(range(1, 33)) + [100 + i]))
        out = sched.schedule()
        first = [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled})
        run_until_done(sched)
        hits = sched.prefix_cache.stats().cached_prompt_tokens
        if policy == "lpm":   # the others wait one step for r0's blocks
            assert first == [("r0", 33)] and hits == 3 * 32
        else:
            assert len(first) == 4 and hits == 0


def test_lpm_never_starves_and_falls_back_to_fcfs_when_the_queue_is_deep() -> None:
    sched = make_sched(policy="lpm", max_num_seqs=1, num_blocks=256, budget=4096)
    sched.add(req("warm", range(1, 21), max_tokens=1))
    run_until_done(sched)
    sched.add(req("loner", range(50, 70), max_tokens=1))
    for i in range(LPM_MAX_OVERTAKES + 5):
        sched.add(req(f"hit{i}", list(range(1, 21)) + [i], max_tokens=1))
    order = run_until_done(sched)
    assert order.index("loner") == LPM_MAX_OVERTAKES   # overtaken exactly the bound, then first
    # Deeper than LPM_MAX_WAITING: plain FCFS.
    sched.add(req("loner2", range(50, 70), max_tokens=1))
    for i in range(LPM_MAX_WAITING):
        sched.add(req(f"deep{i}", list(range(1, 21)) + [i], max_tokens=1))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["loner2"]


# ---- end to end: same tokens with the cache on and off ------------------------------------
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_llm(ckpt: TinyCheckpoint, prefix_cache: str, **kw) -> LLM:
    args = dict(block_size=4, dtype="float32", max_model_len=128, num_kv_blocks=256)
    args.update(kw)
    return LLM(ckpt.path, prefix_cache=prefix_cache, **args)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


@pytest.fixture(scope="module")
def shared_prompts() -> list[list[int]]:
    """24 prompts: 3 shared prefixes (37, 50, 61 tokens) each with 8 unique suffixes of 3-10."""
    rng = random.Random(5)
    prefixes = [[BOS] + [rng.randrange(3, VOCAB) for _ in range(n - 1)] for n in (37, 50, 61)]
    prompts = [p + [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 10))]
               for p in prefixes for _ in range(8)]
    rng.shuffle(prompts)
    return prompts


@pytest.fixture(scope="module")
def reference(tiny_llama, shared_prompts) -> list[list[int]]:
    tokens, outs = generate(make_llm(tiny_llama, "none"), shared_prompts)
    assert all(o.num_cached_tokens == 0 for o in outs)
    return tokens


@pytest.mark.parametrize("num_kv_blocks,budget", [(40, None), (32, 24)])
def test_same_tokens_with_cache_under_eviction(tiny_llama, shared_prompts, reference,
                                               num_kv_blocks, budget) -> None:
    # 40 blocks = 160 tokens: two requests at most at once, so the cache is evicted mid-run;
    # 32 blocks with a 24-token budget adds chunked prefill and preemption.
    llm = make_llm(tiny_llama, "radix", num_kv_blocks=num_kv_blocks, max_num_batched_tokens=budget)
    tokens, outs = generate(llm, shared_prompts)
    assert tokens == reference
    stats = llm.engine.prefix_cache.stats()
    assert stats.evicted_blocks > 0 and stats.hit_rate > 0.3
    assert stats.cached_prompt_tokens == sum(o.num_cached_tokens for o in outs)
    assert all(o.num_cached_tokens % 4 == 0 and o.num_cached_tokens < len(o.prompt_token_ids)
               for o in outs)
    assert_no_leaks(llm.engine)


def test_multi_turn_chat_reuses_its_whole_history(tiny_llama) -> None:
    rng = random.Random(11)
    on, off = make_llm(tiny_llama, "radix"), make_llm(tiny_llama, "none")
    history = [[BOS] + [rng.randrange(3, VOCAB) for _ in range(9)] for _ in range(3)]  # 3 sessions
    for turn in range(3):
        prompts = [h + [rng.randrange(3, VOCAB) for _ in range(5)] for h in history]
        tokens, outs = generate(on, prompts)
        assert tokens == generate(off, prompts)[0]
        for h, o in zip(history, outs):
            # The previous turn computed all of h but its last token (sampled, never fed back).
            assert o.num_cached_tokens == ((len(h) - 1) // 4 * 4 if turn else 0)
        history = [p + t for p, t in zip(prompts, tokens)]
    assert_no_leaks(on.engine)


def test_cache_off_is_the_null_cache(tiny_llama) -> None:
    llm = make_llm(tiny_llama, "none")
    assert isinstance(llm.engine.prefix_cache, NoPrefixCache)
    generate(llm, [[BOS, 5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    s = llm.engine.prefix_cache.stats()
    assert (s.cached_blocks, s.hit_rate, s.prompt_tokens) == (0, 0.0, 18)
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_blocks


def test_smollm2_chat_with_shared_system_prompts(smollm2_llm) -> None:
    llm = smollm2_llm
    systems = ["You are a concise assistant for a cooking website. Answer in one or two sentences, "
               "name exact quantities and temperatures, and never recommend unsafe food handling.",
               "You are a patient physics tutor. Explain ideas with one everyday example, avoid "
               "formulas unless asked, and end with a one-line summary of the key idea."]
    questions = ["How long should I boil an egg?", "Why is the sky blue?", "What is friction?",
                 "What makes bread rise?"]
    convs = [[{"role": "system", "content": s}, {"role": "user", "content": q}]
             for s in systems for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    engine = llm.engine
    cache = engine.prefix_cache
    # The reference: the same engine with the null cache in the scheduler ("off").
    engine.scheduler.prefix_cache = NoPrefixCache(engine.block_pool, engine.cfg.block_size)
    try:
        reference = [o.outputs[0].token_ids for o in llm.chat(convs, params, use_tqdm=False)]
    finally:
        engine.scheduler.prefix_cache = cache
    cache.reset()
    k = len(questions)
    first = llm.chat(convs[::k], params, use_tqdm=False)      # one per system prompt
    rest = llm.chat([c for i, c in enumerate(convs) if i % k], params, use_tqdm=False)
    outs = dict(zip(range(0, len(convs), k), first))
    outs.update(zip([i for i in range(len(convs)) if i % k], rest))
    assert [outs[i].outputs[0].token_ids for i in range(len(convs))] == reference
    system_len = len(llm.apply_chat_template(convs[0][:1], add_generation_prompt=False)["prompt_token_ids"])
    assert all(o.num_cached_tokens >= system_len - 16 for o in rest)
    # The next turn of a chat finds its whole history: prompt and answer.
    turn2 = convs[1] + [{"role": "assistant", "content": outs[1].outputs[0].text},
                        {"role": "user", "content": "And for a soft yolk?"}]
    out = llm.chat(turn2, params, use_tqdm=False)[0]
    history = len(outs[1].prompt_token_ids) + len(outs[1].outputs[0].token_ids)
    assert out.num_cached_tokens >= history - 2 * 16
    assert_no_leaks(engine)
