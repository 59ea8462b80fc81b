"""The engine's one handle on speculative decoding: proposer + adaptive k + stats.

The engine calls `propose(batch)` between scheduling and the forward, and
`observe(batch, result)` after the scheduler has applied the verified tokens. The
scheduler asks `num_spec_tokens(num_running)` how much room to leave for drafts; a step
where that is 0 never reaches the proposer. A proposer that reads the target's hidden
states (MTP, EAGLE) is given the runner's hook.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ember.spec.adaptive import AdaptiveK
from ember.spec.config import SpeculativeConfig
from ember.spec.proposer import create_proposer
from ember.spec.stats import SpecStats

if TYPE_CHECKING:
    from ember.engine.engine import Engine
    from ember.engine.model_runner import StepResult
    from ember.engine.scheduler import SchedulerOutput


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.proposer = create_proposer(cfg, engine)
        if self.proposer.needs_hidden_states:
            engine.runner.hidden_states_hook = self.proposer.observe_hidden_states
        self.kv_lag = self.proposer.kv_lag
        self.stats = SpecStats()
        self.controller = AdaptiveK(cfg.num_speculative_tokens, slots=self.proposer.slots_for,
                                    forwards=self.proposer.forwards_for) \
            if cfg.adaptive and cfg.enabled else None
        self._t_forward = 0.0
        self._k = 0

    def num_spec_tokens(self, num_running: int) -> int:
        if not self.cfg.enabled:
            k = 0
        elif self.controller is not None:
            k = self.controller.choose(num_running)
        else:
            k = self.cfg.num_speculative_tokens
        self._k = k
        return self.proposer.slots_for(k) if k else 0

    def propose(self, batch: SchedulerOutput) -> None:
        if self._k == 0:
            # No request has draft slots, so there is nothing to fill; proposers with a
            # network of their own catch up lazily when a request next drafts, so a step
            # without speculation costs them nothing here.
            self._t_forward = time.perf_counter()
            return
        drafting = sum(1 for s in batch.scheduled if s.num_spec_slots > 0)
        start = time.perf_counter()
        self.proposer.propose(batch)
        forwards = self.proposer.forwards_for(self._k)
        # A catch-up longer than one verification can make valid per request (a first
        # draft after the prompt, or after steps without drafting) is not what a drafting
        # step costs in steady state: it stays out of the draft-cost fit.
        steady = self.proposer.catch_up_tokens <= drafting * (self.cfg.num_speculative_tokens + 1)
        if self.controller is not None and drafting and forwards > 0 and steady:
            per_step = (time.perf_counter() - start) / forwards
            self.controller.observe_draft(drafting, per_step)
        self._t_forward = time.perf_counter()

    def observe(self, batch: SchedulerOutput, result: StepResult) -> None:
        """Record acceptance and the step's cost (forward + verify + bookkeeping)."""
        seconds = time.perf_counter() - self._t_forward
        self.stats.num_steps += 1
        if not self.cfg.enabled:
            return
        spec = [s for s in batch.scheduled if s.spec_token_ids] if self._k else []
        if spec:
            self.stats.num_spec_steps += 1
        self.stats.k_histogram[self._k] = self.stats.k_histogram.get(self._k, 0) + 1
        for s in spec:
            rid = s.request.request_id
            n_acc = result.num_accepted.get(rid)
            if n_acc is None:
                continue
            # A tree counts as drafts along its depth (acceptance per position = per depth).
            k = len(s.spec_token_ids) if s.spec_tree is None else s.spec_tree.max_depth
            self.stats.record(k, n_acc, len(result.sampled[rid]), len(s.spec_token_ids))
            if self.controller is not None:
                self.controller.observe_acceptance(k, n_acc)
        # The cost fits are for the steps k is chosen for: every request decoding (a prefill
        # chunk's cost per token is another regime, and at batch 1 it would set the slope of
        # the line the decode steps are read from).
        if self.controller is not None:
            num_tokens = batch.num_tokens
            # Without drafts, one token per request means every request decodes.
            if num_tokens == len(batch.scheduled) if not spec else \
                    all(s.num_new_tokens == 1 for s in batch.scheduled):
                self.controller.observe_step(num_tokens, seconds, speculative=bool(spec))

    def stats_dict(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d["method"] = self.cfg.method
        d["num_speculative_tokens"] = self.cfg.num_speculative_tokens
        d["adaptive"] = self.cfg.adaptive
        return d
