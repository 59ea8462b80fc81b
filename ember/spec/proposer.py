"""The proposer interface, its null implementation and the registry.

A proposer fills, for each scheduled request the scheduler left room for, a chain of
draft tokens and (optionally) the draft distribution each was drawn from. The shared
verifier (ember.spec.rejection) then makes the output exactly the target's. New
drafting schemes are new proposers (EAGLE next); tree drafts add parent indices.

A proposer that reads the target's hidden states (MTP, EAGLE) sets `needs_hidden_states`:
the runner then hands it every step's hidden states through `observe_hidden_states`. That
runs every step, drafting or not, so it should only keep what a later catch-up needs (an
index copy), never run the proposer's network: steps without drafts must stay free.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ember.engine.engine import Engine
    from ember.engine.model_runner import ModelRunner, TargetHiddenStates
    from ember.engine.scheduler import SchedulerOutput
    from ember.spec.config import SpeculativeConfig


class Proposer:
    """Fills `s.spec_token_ids` (at most `s.num_spec_slots` tokens) and optionally
    `s.spec_probs` ([len(spec_token_ids), vocab] draft distributions; None means each
    draft token was chosen deterministically, i.e. q is one-hot) for every scheduled
    request with `num_spec_slots > 0`."""

    name = "base"
    # Draft positions at the end of a fully accepted chain whose proposer-side state
    # (e.g. a draft model's KV) the proposal did not write. The scheduler counts that many
    # accepted tokens as not yet computed, so the next step recomputes them for both the
    # target and the proposer and the two KV caches always cover the same tokens.
    kv_lag = 0
    # True: the runner calls observe_hidden_states after every forward. False (the default)
    # leaves the runner's path untouched.
    needs_hidden_states = False
    # Tokens the last propose() ran the proposer's network over to catch up with the target
    # (each drafting request from its coverage to its last token); 0 for proposers without
    # a network. A large catch-up (a request's first draft, or its first after steps
    # without drafting) is left out of the adaptive controller's draft-cost fit.
    catch_up_tokens = 0

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """State the proposer keeps per slot of the target's KV pool (its own K/V, the
        target rows it reads), which the pool's sizing leaves room for; 0 for none."""
        return 0

    def allocate(self, runner: ModelRunner) -> None:
        """Allocate that per-slot state, once the runner has sized its pool (num_blocks)."""
        return None

    def propose(self, batch: SchedulerOutput) -> None:
        raise NotImplementedError

    def observe_hidden_states(self, step: TargetHiddenStates) -> None:
        """The target's hidden states of every token it computed this step (prefill chunks,
        decodes, drafts) and the KV slot of each, on the device. Called every step, before
        the scheduler's update: after verification, or at launch for a step that async
        scheduling defers, when the host knows neither its tokens nor the step before's.
        So keep it cheap and on the device (no .item(), .tolist(), .cpu()); the rows are
        only valid during the call."""
        raise NotImplementedError

    def slots_for(self, k: int) -> int:
        """Draft slots per request the scheduler leaves for a step of k drafts (a tree of
        depth k holds more nodes than k)."""
        return k

    def forwards_for(self, k: int) -> int:
        """Proposer forwards a step of k drafts costs, its catch-up included (the adaptive
        controller's cost model)."""
        return k


class NoProposer(Proposer):
    """Speculation off: the scheduler never leaves room, so there is nothing to fill."""

    name = "none"

    def propose(self, batch: SchedulerOutput) -> None:
        return None


def create_proposer(cfg: SpeculativeConfig, engine: Engine) -> Proposer:
    """The registry: cfg.method -> proposer."""
    if cfg.method == "none":
        return NoProposer()
    if cfg.method == "ngram":
        from ember.spec.ngram import NgramProposer
        return NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
    if cfg.method == "draft":
        from ember.spec.draft_model import DraftModelProposer
        return DraftModelProposer(cfg, engine)
    if cfg.method == "mtp":
        from ember.spec.mtp import MTPProposer
        return MTPProposer(cfg, engine)
    if cfg.method == "eagle":
        from ember.spec.eagle_proposer import EagleProposer
        return EagleProposer(cfg, engine)
    if cfg.method == "peagle":
        from ember.spec.eagle_proposer import PEagleProposer
        return PEagleProposer(cfg, engine)
    raise ValueError(f"unknown speculative method {cfg.method!r}")
