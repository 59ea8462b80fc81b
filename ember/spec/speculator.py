"""The engine's one handle on speculative decoding: proposer + adaptive k + stats.

Each engine step starts with `plan(num_running)`: the step's k (0: no drafts). A step
with k > 0 reads its requests' latest tokens, so the engine applies the step in flight
first; a step with k = 0 may run ahead under async scheduling. The scheduler leaves
`slots_for(k)` draft slots per decoding request; the engine calls `propose(batch)`
between scheduling and the forward (a step whose k is 0 never reaches the proposer),
`launched(step)` after the launch and `observe(batch, result)` after the scheduler has
applied the verified tokens. A proposer that reads the target's hidden states (MTP,
EAGLE) is given the runner's hook.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ember.spec.adaptive import AdaptiveK
from ember.spec.config import SpeculativeConfig
from ember.spec.proposer import create_proposer
from ember.spec.stats import SpecStats
from ember.spec.step_clock import StepClock

if TYPE_CHECKING:
    from ember.engine.engine import Engine
    from ember.engine.model_runner import LaunchedStep, StepResult
    from ember.engine.scheduler import ScheduledRequest, SchedulerOutput


def keepable(s: ScheduledRequest, k: int, n_acc: int, emitted: int) -> tuple[int, int, int]:
    """(drafts, accepted, emitted) of an applied step as far as max_tokens let them count.
    The scheduler drafts full chains and trees up to a request's end (captured shapes), so
    a step with fewer tokens left than it can emit counts only the first left - 1 drafts
    (those a kept token could come from) and at most `left` tokens: the statistics are
    those of a step that had drafted no further."""
    r = s.request
    if s.num_appended is None:   # not applied to the request (it had ended)
        return k, n_acc, emitted
    left = r.max_tokens - (r.num_output_tokens - s.num_appended)   # tokens it could still take
    if left > k:
        return k, n_acc, emitted
    k = left - 1
    return k, min(n_acc, k), min(emitted, left)


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.proposer = create_proposer(cfg, engine)
        if self.proposer.needs_hidden_states:
            engine.runner.hidden_states_hook = self.proposer.observe_hidden_states
        self.kv_lag = self.proposer.kv_lag
        self.stats = SpecStats()
        # Re-timing plain steps while speculating takes a steady one, which under async
        # scheduling needs three in a row (ember.spec.step_clock).
        self.controller = AdaptiveK(cfg.num_speculative_tokens, slots=self.proposer.slots_for,
                                    forwards=self.proposer.forwards_for,
                                    retime_steps=3 if engine.async_scheduling else 1) \
            if cfg.adaptive and cfg.enabled else None
        self.clock = StepClock()
        self._draft_seconds = 0.0   # the last propose()'s
        # The first drafting step of each (k, drafting requests) is a warm-up: new shapes
        # compile kernels and capture graphs, seconds to milliseconds, once. Timed, it would
        # set the cost fits so high that speculation never runs again (they only learn from
        # the steps that draft); it stays out of them.
        self._warm: set[tuple[int, int]] = set()
        self._untimed = False

    def plan(self, num_running: int) -> int:
        """The next step's k: draft tokens per decoding request (a tree's depth); 0 = none."""
        if num_running == 0:
            self.clock.restart()   # only new requests (or none): no step to time against
        if not self.cfg.enabled:
            return 0
        if self.controller is not None:
            return self.controller.choose(num_running)
        return self.cfg.num_speculative_tokens

    def verify_widths(self) -> tuple[int, ...]:
        """Query tokens per request of the verify steps this speculator can ask for (its
        last token and the draft slots of each k it may choose): the CUDA graphs to capture."""
        if not self.cfg.enabled:
            return ()
        top = self.cfg.num_speculative_tokens
        ks = range(1, top + 1) if self.controller is not None else (top,)
        return tuple(sorted({self.proposer.slots_for(k) + 1 for k in ks}))

    def slots_for(self, k: int) -> int:
        """Draft slots per decoding request the scheduler leaves for a step of k drafts."""
        return self.proposer.slots_for(k)

    def propose(self, batch: SchedulerOutput) -> None:
        k = batch.spec_k
        self._draft_seconds = 0.0
        if k == 0:
            # No request has draft slots, so there is nothing to fill; proposers with a
            # network of their own catch up lazily when a request next drafts, so a step
            # without speculation costs them nothing here.
            return
        drafting = sum(1 for s in batch.scheduled if s.num_spec_slots > 0)
        self._untimed = (k, drafting) not in self._warm
        self._warm.add((k, drafting))
        start = time.perf_counter()
        self.proposer.propose(batch)
        self._draft_seconds = time.perf_counter() - start
        forwards = self.proposer.forwards_for(k)
        # A catch-up longer than one verification can make valid per request (a first
        # draft after the prompt, or after steps without drafting) is not what a drafting
        # step costs in steady state: it stays out of the draft-cost fit.
        steady = self.proposer.catch_up_tokens <= drafting * (self.cfg.num_speculative_tokens + 1)
        if self.controller is not None and drafting and forwards > 0 and steady and not self._untimed:
            self.controller.observe_draft(drafting, self._draft_seconds / forwards)

    def launched(self, step: LaunchedStep) -> None:
        """A step was launched (deferred or resolved already): the clock's count."""
        if self.controller is not None:
            self.clock.launched(step.deferred)

    def observe(self, batch: SchedulerOutput, result: StepResult) -> None:
        """Record acceptance and the step's cost (its interval, see ember.spec.step_clock)."""
        self.stats.num_steps += 1
        if not self.cfg.enabled:
            return
        spec = [s for s in batch.scheduled if s.spec_token_ids]
        if spec:
            self.stats.num_spec_steps += 1
        hist = self.stats.k_histogram
        hist[batch.spec_k] = hist.get(batch.spec_k, 0) + 1
        for s in spec:
            rid = s.request.request_id
            n_acc = result.num_accepted.get(rid)
            if n_acc is None:
                continue
            # A tree counts as drafts along its depth (acceptance per position = per depth).
            k = len(s.spec_token_ids) if s.spec_tree is None else s.spec_tree.max_depth
            k, n_acc, emitted = keepable(s, k, n_acc, len(result.sampled[rid]))
            if k <= 0:
                continue
            self.stats.record(k, n_acc, emitted, len(s.spec_token_ids))
            if self.controller is not None:
                self.controller.observe_acceptance(k, n_acc)
        if self.controller is None:
            return
        seconds, steady = self.clock.applied()
        if spec and seconds is not None:
            # A drafting step is applied right after its drafts (no async step between).
            seconds = None if self._untimed else seconds - self._draft_seconds
        # The cost fits are for the steps k is chosen for: every request decoding (a prefill
        # chunk's cost per token is another regime, and at batch 1 it would set the slope of
        # the line the decode steps are read from).
        num_tokens = batch.num_tokens
        # Without drafts, one token per request means every request decodes.
        decode = num_tokens == len(batch.scheduled) if not spec else \
            all(s.num_new_tokens == 1 for s in batch.scheduled)
        self.controller.observe_applied(num_tokens if decode else None, seconds, bool(spec), steady)

    def stats_dict(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d["method"] = self.cfg.method
        d["num_speculative_tokens"] = self.cfg.num_speculative_tokens
        d["adaptive"] = self.cfg.adaptive
        return d
