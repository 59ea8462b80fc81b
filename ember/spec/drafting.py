"""Pieces shared by the proposers that run a network of their own (draft model, MTP):
a paged KV cache on the target's block tables with per-request coverage, and drawing
draft tokens under each request's sampling settings.

KV layout: the proposer keeps its own KV tensors (one per attention layer, shaped by the
layer's KV cache spec: paged K/V, MLA's latent rows, ...) but uses the target's block ids,
block tables and slots, so preemption, rollback and freeing need nothing of their own:
whatever the scheduler does to a request's blocks applies to both caches. Token p of a
request lives in the slot the target uses for p.

Coverage: per request, how many leading positions of the proposer's KV are valid, and
optionally a small state that goes with them (the MTP keeps its last output row). It is
trusted only while the request keeps its blocks: a preemption gives them back, so the
request starts from 0 again; and never past `num_computed_tokens`, because positions
after it (rejected drafts) get recomputed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ember.cache.kv_spec import KVCacheLayer, allocate_kv_caches
from ember.engine.scheduler import ScheduledRequest
from ember.layers.sampler import SamplingBatch, SamplingRow, sampling_probs
from ember.spec.rejection import sample_from

if TYPE_CHECKING:
    from ember.engine.model_runner import ModelRunner, TargetHiddenStates
    from ember.engine.request import Request

Key = tuple[str, float]


class ProposerKV:
    """A proposer's paged KV (one tensor per attention layer, as many blocks as the
    target's pool) and its per-request coverage."""

    def __init__(self, layers: Sequence[KVCacheLayer], runner: ModelRunner) -> None:
        self.caches = allocate_kv_caches(layers, runner.num_blocks, runner.block_size, runner.dtype,
                                         runner.device)
        # (request id, arrival) -> (valid leading positions, the request's preemption count
        # then, the proposer's state for those positions)
        self._entries: dict[Key, tuple[int, int, Any]] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches)

    @staticmethod
    def _key(r: Request) -> Key:
        return r.request_id, r.arrival_time   # ids may be reused later

    def covered(self, r: Request) -> int:
        """Leading positions of r with valid proposer K/V."""
        covered, preemptions, _ = self._entries.get(self._key(r), (0, r.num_preemptions, None))
        if preemptions != r.num_preemptions:
            return 0   # its blocks were given back; whatever it has now was not ours
        return min(covered, r.num_computed_tokens)

    def state(self, r: Request, covered: int) -> Any:
        """The state recorded with exactly `covered` positions, or None if r's entry is
        another (older, newer, or from before a preemption)."""
        entry = self._entries.get(self._key(r))
        if entry is None or entry[0] != covered or entry[1] != r.num_preemptions:
            return None
        return entry[2]

    def record(self, r: Request, covered: int, state: Any = None) -> None:
        self._entries[self._key(r)] = (covered, r.num_preemptions, state)

    def drafting_states(self, scheduled: list[ScheduledRequest]
                        ) -> tuple[list[ScheduledRequest], list[Any]]:
        """The requests that draft this step (num_spec_slots > 0) and have a recorded state
        at their computed length, with those states; forgets finished requests first."""
        self.forget_finished(scheduled)
        spec, states = [], []
        for s in scheduled:
            if s.num_spec_slots > 0:
                state = self.state(s.request, s.request.num_computed_tokens)
                if state is not None:   # always, unless the request's state moved under us
                    spec.append(s)
                    states.append(state)
        return spec, states

    def forget_finished(self, live: list[ScheduledRequest]) -> None:
        """Drop the entries of requests no longer scheduled, once there are many."""
        if len(self._entries) > 4 * len(live) + 256:
            keep = {self._key(s.request) for s in live}
            self._entries = {k: e for k, e in self._entries.items() if k in keep}


def draw_drafts(spec: list[ScheduledRequest], active: list[int],
                logits: torch.Tensor,  # [len(active), >= vocab] the proposer's logits, one row per active request
                tokens: list[list[int]], probs: list[list[torch.Tensor]], vocab_size: int) -> None:
    """Draw the next draft of each active request from the proposer's distribution under
    the request's own sampling settings (greedy stays greedy: q is one-hot at the argmax),
    with the request's generator; append the token to tokens[i] and q ([vocab]) to probs[i].
    Penalties and min_tokens see the drafts so far as output, as the verifier's p will."""
    rows = []
    for i in active:
        r = spec[i].request
        rows.append(SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids + tokens[i],
                                None, r.eos_token_ids))
    q = sampling_probs(logits[:, :vocab_size], SamplingBatch.build(rows, vocab_size, logits.device))
    drawn = sample_from(q, [spec[i].request.generator for i in active]).tolist()
    for row, i in enumerate(active):
        tokens[i].append(drawn[row])
        probs[i].append(q[row])


def known_pairs(step: TargetHiddenStates) -> tuple[list[tuple[list[int], int, list[int]]], list[int], list[int]]:
    """The pairs (t_{i+1}, h_i) a target step made known, for a proposer that runs over
    the target's hidden states (MTP, EAGLE): per scheduled request, its positions i whose
    row stands (a prefill chunk, a decode, the accepted drafts) with t_{i+1} from the
    prompt or the step's new tokens. Returns the sequences for build_forward_batch
    (block ids, first position, the t_{i+1}; single-query sequences first), the hidden
    rows h_i in the same order, and the scheduled index of each sequence."""
    seqs, rows, owners = [], [], []
    for i, s in enumerate(step.scheduled):
        r, n = s.request, step.num_valid[i]
        start = r.num_computed_tokens
        if s.samples:   # the last pair's t_{i+1} is the step's first new token
            nxt = r.token_ids[start + 1:] + step.sampled[r.request_id]
        else:           # a prefill chunk: the token after its last is a prompt token
            nxt = r.token_ids[start + 1:start + n + 1]
        seqs.append((r.block_ids, start, nxt[:n]))
        rows.append(range(step.row_starts[i], step.row_starts[i] + n))
        owners.append(i)
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j][2]) != 1)   # the backend batches decodes
    return [seqs[j] for j in order], [x for j in order for x in rows[j]], [owners[j] for j in order]
