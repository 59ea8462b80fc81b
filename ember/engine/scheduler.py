"""Continuous batching under a per-step token budget, with chunked prefill and preemption."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ember.cache.block_pool import BlockPool
from ember.engine.request import Request, RequestStatus

logger = logging.getLogger("ember")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int   # tokens computed for this request in this step

    @property
    def samples(self) -> bool:
        """True when this step reaches the request's last token, so a new one is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS. Each step: running requests first (a decode token, or their next prefill chunk),
    then waiting ones while the token budget, the sequence cap and free blocks allow.
    When blocks run out, the most recently admitted request is preempted: its blocks are
    freed and it goes back to the front of the queue to be recomputed later.
    """

    def __init__(self, block_pool: BlockPool, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._grow(req, req.num_computed_tokens + n):
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
                continue
            victim = self.running.pop()  # latest admitted; never one already scheduled
            self._preempt(victim)
            out.preempted.append(victim)
        # Admitting new work while evicting running work would only thrash.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests that stop.
        Returns the requests that got a new token or finished."""
        touched = []
        for s in out.scheduled:
            req = s.request
            sample = s.samples
            req.num_computed_tokens += s.num_new_tokens
            if not sample:
                continue
            token = sampled[req.request_id]
            req.token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            req.check_stop(token, self.max_model_len)
            touched.append(req)
            if req.finished:
                self._release(req)
        return touched

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request from outside the token loop (stop string, abort)."""
        if req.finished:
            return
        req.finish(reason, stop_reason)
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.block_pool.free(req.block_ids)
        req.block_ids = []

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make sure req has blocks for num_tokens tokens; False if the pool is too small now."""
        need = -(-num_tokens // self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.block_pool.num_free:
            return False
        req.block_ids.extend(self.block_pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self.block_pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        logger.debug("preempted %s (KV pool full); it will be recomputed", req.request_id)
