"""Continuous batching under a per-step token budget, with chunked prefill and preemption."""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ember.cache.block_pool import BlockPool
from ember.cache.prefix import InBatchPrefixes, NoPrefixCache, PrefixCache
from ember.engine.request import Request, RequestStatus

logger = logging.getLogger("ember")

SCHEDULING_POLICIES = ("lpm", "fcfs")
LPM_MAX_WAITING = 128   # deeper queues are admitted FCFS: matching them all costs more than it buys
LPM_MAX_OVERTAKES = 32  # a request passed over this often by later arrivals is admitted in FCFS order


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int   # the request's own tokens computed in this step
    # Speculation: room the scheduler left (KV blocks, token budget) for draft tokens,
    # and the drafts a proposer put there; they are computed after the request's own
    # tokens, in the same forward, and verified against the target.
    num_spec_slots: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None   # [len(spec_token_ids), vocab] draft q; None = one-hot
    # A draft tree instead of a chain (ember.spec.tree.DraftTree): spec_token_ids are then
    # its node tokens in node order, verified in one forward under a tree attention mask.
    spec_tree: Any = None
    # Fixed when scheduled (the request's own counts lag under async scheduling, where a
    # step is scheduled before the previous one is applied): the first position computed;
    # whether the step reaches the request's last token, so samples a new one; and the
    # request's preemption count, so a step applied after a preemption is recognised.
    start: int = -1
    samples: bool | None = None
    preemptions: int = -1
    # Set by update(): the tokens appended (fewer than sampled when a stop ended the request
    # inside this step's tokens; the speculator's statistics count only those).
    num_appended: int | None = None

    def __post_init__(self) -> None:
        r = self.request
        if self.start < 0:
            self.start = r.num_computed_tokens + r.num_inflight_tokens
        if self.samples is None:
            self.samples = self.start + self.num_new_tokens == r.num_tokens + r.num_pending_samples
        self.preemptions = r.num_preemptions

    @property
    def num_query_tokens(self) -> int:
        """Tokens this request puts in the forward: its own plus its drafts."""
        return self.num_new_tokens + len(self.spec_token_ids)

    @property
    def num_pending_inputs(self) -> int:
        """Own tokens of this step not on the host yet (0, or 1: the token the step in
        flight samples, which the runner takes from the device)."""
        return max(0, self.start + self.num_new_tokens - self.request.num_tokens)

    @property
    def query_token_ids(self) -> list[int]:
        """The tokens to compute; a pending input is a 0 placeholder (see num_pending_inputs)."""
        own = self.request.token_ids[self.start:self.start + self.num_new_tokens]
        return own + [0] * self.num_pending_inputs + self.spec_token_ids


class SpecPolicy(Protocol):
    """What the scheduler needs to know about speculation (ember.spec.Speculator)."""

    kv_lag: int

    def slots_for(self, k: int) -> int:
        """Draft slots per decoding request for a step of k drafts (a tree: more)."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    spec_k: int = 0   # the drafts per request (a tree's depth) the step was planned with

    @property
    def num_tokens(self) -> int:
        return sum(s.num_query_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS (or cache-aware, below). Each step: running requests first (a decode token, or their next prefill chunk),
    then waiting ones while the token budget, the sequence cap and free blocks allow.
    When blocks run out, unused prefix-cache blocks are evicted first; failing that, the most
    recently admitted request is preempted: its blocks are freed and it goes back to the
    front of the queue to be recomputed later.

    With a prefix cache, an admitted request starts from the longest cached prefix of its
    tokens, and its computed blocks are cached after each prefill chunk and when it ends.
    Policy `lpm` admits waiting requests with the longest cached prefix first (SGLang's
    longest-prefix-match), and holds back for a step a request whose next uncached blocks
    another request is computing now (it will find them cached). Preempted requests, and
    requests overtaken LPM_MAX_OVERTAKES times, go first in queue order and are never held
    back; a queue deeper than LPM_MAX_WAITING is FCFS.
    """

    def __init__(self, block_pool: BlockPool, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 prefix_cache: PrefixCache | None = None, policy: str = "fcfs",
                 spec: SpecPolicy | None = None) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; choose one of "
                             f"{', '.join(SCHEDULING_POLICIES)}")
        self.block_pool = block_pool
        self.prefix_cache = prefix_cache or NoPrefixCache(block_pool, block_size)
        self.policy = policy
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.spec = spec

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, spec_k: int = 0) -> SchedulerOutput:
        """The next step. spec_k > 0 (speculation planned for it, Speculator.plan): decoding
        requests get room for drafts; the step in flight, if any, must have been applied."""
        if spec_k and any(r.num_inflight_tokens for r in self.running):
            raise RuntimeError("a step that drafts is scheduled while a step is in flight")
        out = SchedulerOutput(spec_k=spec_k)
        budget = self.max_num_batched_tokens
        k = self.spec.slots_for(spec_k) if spec_k and self.spec is not None else 0
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # Counting the step in flight, if any (async scheduling).
            computed = req.num_computed_tokens + req.num_inflight_tokens
            total = req.num_tokens + req.num_pending_samples
            if req.num_pending_samples and (
                    req.num_output_tokens + req.num_pending_samples >= req.max_tokens
                    or total >= self.max_model_len):
                i += 1   # its pending token ends it by length: nothing more to compute
                continue
            n = min(total - computed, budget)
            room = self._spec_room(req, n, k, budget)
            if room and self._grow(req, computed + n + room):
                out.scheduled.append(ScheduledRequest(req, n, num_spec_slots=room))
                budget -= n + room
                i += 1
                continue
            if self._grow(req, computed + n):
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
                continue
            victim = self.running.pop()  # latest admitted; never one already scheduled
            self._preempt(victim)
            out.preempted.append(victim)
        # Admitting new work while evicting running work would only thrash.
        order, inflight = self._admission_order(out)
        for req in order:
            if budget <= 0 or out.preempted or len(self.running) >= self.max_num_seqs:
                break
            if inflight is not None and not self._has_priority(req):
                tokens = self._cacheable(req)
                if inflight.covers(tokens, self.prefix_cache.match_length(tokens)):
                    continue
            self._match(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + n):
                self._give_back(req)
                req.num_computed_tokens = 0
                break
            self._dequeue(req)
            if req.num_cached_tokens is None:  # first admission
                req.num_cached_tokens = req.num_computed_tokens
                self.prefix_cache.record_admission(req.num_prompt_tokens, req.num_computed_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            if inflight is not None:
                inflight.add(req.token_ids, req.num_computed_tokens)
        for s in out.scheduled:   # until update() applies the step
            s.request.num_inflight_tokens += s.num_new_tokens
            s.request.num_pending_samples += s.samples
        return out

    def _spec_room(self, req: Request, n: int, k: int, budget: int) -> int:
        """Draft slots for req this step: only when the step reaches its last token (it
        decodes) and may emit more than one, within the budget and the context. Not cut
        to the tokens it may still emit: the tokens after max_tokens are dropped by the
        stop check, and a full-size step keeps a captured verify shape (a tree or chain
        shrunk near the end would run eagerly, ~20x slower on the GPU, for each of the
        request's last steps)."""
        if k <= 0 or req.num_computed_tokens + n != req.num_tokens or n > 1 + self.spec.kv_lag:
            return 0
        if req.max_tokens - req.num_output_tokens <= 1:   # its last token: no draft could be kept
            return 0
        if req.prompt_logprobs is not None and len(req.prompt_logprobs) < req.num_prompt_tokens:
            return 0
        # A step emits at most room + 1 tokens, the last at position num_tokens + room.
        return max(0, min(k, budget - n, self.max_model_len - req.num_tokens - 1))

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int] | int]) -> list[Request]:
        """Advance computed counts, append sampled tokens (one, or the verified tokens of a
        speculating request; a bare int is one token), finish requests that stop, roll
        back rejected drafts.
        Returns the requests that got new tokens or finished."""
        touched = []
        for s in out.scheduled:
            req = s.request
            req.num_inflight_tokens -= s.num_new_tokens
            req.num_pending_samples -= s.samples
            if req.finished:
                continue   # ended (stop, abort) after this step was scheduled: drop its tokens
            if s.preemptions == req.num_preemptions:   # else its K/V is gone: recomputed later
                req.num_computed_tokens += s.num_new_tokens
                if s.num_new_tokens > 1:  # a prefill chunk: later requests may share it now
                    self._cache_running(req)
            if not s.samples:
                continue
            appended = 0
            tokens = sampled[req.request_id]
            for token in [tokens] if isinstance(tokens, int) else tokens:
                req.token_ids.append(token)
                appended += 1
                req.check_stop(token, self.max_model_len)
                if req.finished:   # the tokens after a stop are dropped
                    break
            s.num_appended = appended
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            if s.spec_token_ids:
                self._keep_accepted(req, s, appended)
            touched.append(req)
            if req.finished:
                self._release(req)
        return touched

    def _keep_accepted(self, req: Request, s: ScheduledRequest, appended: int) -> None:
        """Rollback: the drafts kept are those appended before the last appended token;
        their K/V (written this step) stays, the rest of the step's slots are released."""
        lag = self.spec.kv_lag if self.spec is not None else 0
        kept = max(0, min(appended - 1, len(s.spec_token_ids) - lag))
        req.num_computed_tokens += kept
        need = -(-req.num_computed_tokens // self.block_size)
        if len(req.block_ids) > need:
            # Blocks past the kept tokens were allocated this step for drafts: fresh,
            # never cached, so freeing them returns them to the pool.
            self.block_pool.free(req.block_ids[need:])
            del req.block_ids[need:]

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Drop req's tokens past num_tokens (a stop string ended it mid-way through a
        speculative step's tokens)."""
        del req.token_ids[num_tokens:]
        req.num_computed_tokens = min(req.num_computed_tokens, num_tokens - 1)
        if req.logprobs is not None:
            del req.logprobs[max(0, num_tokens - req.num_prompt_tokens):]

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request from outside the token loop (stop string, abort)."""
        if req.finished:
            return
        req.finish(reason, stop_reason)
        self._release(req)

    def _release(self, req: Request) -> None:
        """A finished request leaves the queues and lets go of its blocks. A step still in
        flight may write its last K/V into them: that write is ordered on the device before
        any later step's, so handing the blocks out again at once is safe."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:   # preempted while its last step was in flight
            self.waiting.remove(req)
        self._give_back(req)

    # ---- prefix cache -----------------------------------------------------------------------
    def _cacheable(self, req: Request) -> list[int]:
        """The tokens whose K/V req may take from the cache: all but the last (it must be
        computed to sample), and no prompt token still to be scored for prompt logprobs."""
        limit = req.num_tokens - 1
        if req.prompt_logprobs is not None:
            limit = min(limit, len(req.prompt_logprobs) - 1)
        return req.token_ids[:limit]

    def _match(self, req: Request) -> None:
        """Start req (holding no blocks) from the longest cached prefix of its tokens."""
        m = self.prefix_cache.match(self._cacheable(req))
        self.block_pool.share(m.block_ids)
        req.block_ids = list(m.block_ids)
        req.num_computed_tokens = m.num_tokens
        req.prefix_handle = m.handle

    def _cache_running(self, req: Request) -> None:
        """Cache req's computed full blocks and move its lock to the end of them. Where the
        cache already held those tokens in other blocks, req switches to the cache's
        (same K/V) and frees its duplicates."""
        n = req.num_computed_tokens
        m = self.prefix_cache.insert(req.token_ids[:n], req.block_ids[:n // self.block_size])
        self.prefix_cache.lock(m.handle)
        self.prefix_cache.unlock(req.prefix_handle)
        req.prefix_handle = m.handle
        for i, b in enumerate(m.block_ids):
            if req.block_ids[i] != b:
                self.block_pool.share([b])
                self.block_pool.free([req.block_ids[i]])
                req.block_ids[i] = b

    def _give_back(self, req: Request) -> None:
        """req lets go of its blocks; the cache keeps (unlocked) those with computed K/V."""
        n = req.num_computed_tokens
        self.prefix_cache.insert(req.token_ids[:n], req.block_ids[:n // self.block_size])
        self.prefix_cache.unlock(req.prefix_handle)
        req.prefix_handle = None
        self.block_pool.free(req.block_ids)
        req.block_ids = []

    def _has_priority(self, req: Request) -> bool:
        return req.num_preemptions > 0 or req.num_overtaken >= LPM_MAX_OVERTAKES

    def _admission_order(self, out: SchedulerOutput) -> tuple[list[Request], InBatchPrefixes | None]:
        """The order to try waiting requests in and, under lpm, the blocks being computed
        this step (to hold back requests that would compute them again)."""
        waiting = list(self.waiting)
        if (self.policy != "lpm" or len(waiting) > LPM_MAX_WAITING
                or isinstance(self.prefix_cache, NoPrefixCache)):
            return waiting, None
        inflight = InBatchPrefixes(self.block_size)
        for s in out.scheduled:
            if s.start < s.request.num_tokens - 1:   # still prefilling
                inflight.add(s.request.token_ids, s.start)
        if len(waiting) < 2 or self.prefix_cache.num_cached_blocks == 0:
            return waiting, inflight

        def key(r: Request) -> tuple[int, int]:
            if self._has_priority(r):
                return (0, 0)   # queue order, ahead of everyone
            return (1, -self.prefix_cache.match_length(self._cacheable(r)))
        return sorted(waiting, key=key), inflight   # stable: FCFS among equal matches

    def _dequeue(self, req: Request) -> None:
        """Take req out of the queue; the earlier arrivals it overtook count it."""
        if self.waiting[0] is req:
            self.waiting.popleft()
            return
        i = next(i for i, w in enumerate(self.waiting) if w is req)
        for w in itertools.islice(self.waiting, i):
            w.num_overtaken += 1
        del self.waiting[i]

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make sure req has blocks for num_tokens tokens, evicting unused cached prefixes
        if it must; False if the pool is too small now."""
        need = -(-num_tokens // self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        short = need - self.block_pool.num_free
        if short > 0:
            if short > self.prefix_cache.num_evictable_blocks:
                return False
            self.prefix_cache.evict(short)
            if need > self.block_pool.num_free:
                return False
        req.block_ids.extend(self.block_pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self._give_back(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        logger.debug("preempted %s (KV pool full); it will be recomputed", req.request_id)
