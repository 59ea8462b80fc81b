"""Pieces shared by the proposers that run a network of their own (draft model, MTP,
EAGLE): a paged KV cache on the target's block tables with per-request coverage, a paged
store of the target's hidden rows (for the proposers that read them), their lazy
catch-up, and drawing draft tokens under each request's sampling settings.

KV layout: the proposer keeps its own KV tensors (one per attention layer, shaped by the
layer's KV cache spec: paged K/V, MLA's latent rows, ...) but uses the target's block ids,
block tables and slots, so preemption, rollback and freeing need nothing of their own:
whatever the scheduler does to a request's blocks applies to both caches. Token p of a
request lives in the slot the target uses for p.

Coverage: per request, how many leading positions of the proposer's KV are valid. It is
trusted only while the request keeps its blocks: a preemption gives them back, so the
request starts from 0 again; and never past `num_computed_tokens`, because positions
after it (rejected drafts) get recomputed.

Lazy catch-up: a proposer runs its network only for the requests that draft, when they
draft, first over the positions from its coverage to the request's last computed one.
Steps where nobody drafts (adaptive k = 0) run no proposer forward at all. A proposer that
reads the target's hidden states (MTP, EAGLE) needs them for those positions: the runner's
hook copies every computed token's row into `TargetRows` (one index copy per step, on the
same block tables), and the catch-up reads them back.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ember.cache.kv_spec import KVCacheLayer, allocate_kv_caches, kv_bytes_per_token
from ember.engine.forward_batch import ForwardBatch, long_tensor
from ember.engine.model_runner import build_forward_batch
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
        # (request id, arrival) -> (valid leading positions, the request's preemption count then)
        self._entries: dict[Key, tuple[int, int]] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches)

    @staticmethod
    def bytes_per_token(layers: Sequence[KVCacheLayer], dtype: torch.dtype) -> int:
        """What a ProposerKV over `layers` takes per slot of the pool."""
        return kv_bytes_per_token(layers, dtype)

    @staticmethod
    def _key(r: Request) -> Key:
        return r.request_id, r.arrival_time   # ids may be reused later

    def covered(self, r: Request) -> int:
        """Leading positions of r with valid proposer K/V."""
        covered, preemptions = self._entries.get(self._key(r), (0, r.num_preemptions))
        if preemptions != r.num_preemptions:
            return 0   # its blocks were given back; whatever it has now was not ours
        return min(covered, r.num_computed_tokens)

    def record(self, r: Request, covered: int) -> None:
        self._entries[self._key(r)] = (covered, r.num_preemptions)

    def forget_finished(self, live: list[ScheduledRequest]) -> None:
        """Drop the entries of requests no longer scheduled, once there are many."""
        if len(self._entries) > 4 * len(live) + 256:
            keep = {self._key(s.request) for s in live}
            self._entries = {k: e for k, e in self._entries.items() if k in keep}


class TargetRows:
    """One row per token the target computed (MTP: its hidden state after the final norm;
    EAGLE-3: the aux residual streams), paged like ProposerKV: position p of a request in
    the slot the target uses for p. A row is valid wherever the target's K/V is: for every
    position below num_computed_tokens, prefix-cache hits included (a cached block's rows
    were written by the request that computed it, and depend only on the prefix), and
    preemption, rollback and freeing need nothing of their own.

    Memory: width * dtype bytes per slot of the pool, beside the target's KV (SmolLM2,
    width = 576 for MTP: 5% of its 30 layers' K/V per token; 1,728 for EAGLE-3's three
    streams: 15%)."""

    def __init__(self, width: int, runner: ModelRunner) -> None:
        self.block_size = runner.block_size
        self.device = runner.device
        self.rows = torch.zeros((runner.num_blocks * runner.block_size, width), dtype=runner.dtype,
                                device=runner.device)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    @staticmethod
    def bytes_per_token(width: int, dtype: torch.dtype) -> int:
        """What TargetRows of `width` take per slot of the pool."""
        return width * torch.empty((), dtype=dtype).element_size()

    def write(self, step: TargetHiddenStates, rows: torch.Tensor) -> None:
        """The hook's whole work: one index copy of the step's rows ([>= T, width], in
        its row order) to their positions' slots, on the device (nothing read back, so a
        deferred step hands its rows over at launch). Rows of rejected drafts land past
        their request's computed tokens, invalid like their K/V until recomputed."""
        slots = step.slot_mapping
        self.rows.index_copy_(0, slots, rows[:slots.shape[0]].to(self.rows.dtype))


def state_bytes_per_token(layers: Sequence[KVCacheLayer], width: int, dtype: torch.dtype) -> int:
    """What a proposer with a network keeps per slot of the pool: its ProposerKV over
    `layers` and TargetRows of `width`."""
    return ProposerKV.bytes_per_token(layers, dtype) + TargetRows.bytes_per_token(width, dtype)


def catch_up(kv: ProposerKV, scheduled: list[ScheduledRequest], block_size: int, device: torch.device,
             max_tokens: int, forward: Callable[[ForwardBatch], torch.Tensor],
             extra_rows: Callable[[ScheduledRequest], int] | None = None
             ) -> tuple[list[ScheduledRequest], torch.Tensor | None, int, torch.Tensor | None]:
    """The catch-up of a proposer that reads the target's hidden states: for each request
    that drafts this step, run `forward` over the pairs (t_{i+1}, h_i) at the positions i
    from its coverage to its last computed one (at least that last one, whose output gives
    the first draft), and record the new coverage.

    forward(fb) -> o [T, H] runs the proposer's network over a ForwardBatch of pairs
    (fb.input_ids are the t_{i+1}; fb.slot_mapping the positions' slots, where TargetRows
    holds their h_i). Forwards hold at most max_tokens pairs (the target's step budget): a
    longer catch-up (every request's first draft after many steps without) runs in
    several, each request's pairs in order. Returns the drafting requests, the output of
    each one's last pair ([B, H], in that order; None if none drafts), the pairs run, and
    the outputs of the extra rows (below; else None).

    extra_rows(s): rows to run after request s's pairs in the same forward, at the positions
    after its last pair, with token id -1 (P-EAGLE's mask rows: `forward` gives them the
    mask inputs; their outputs come back as [sum of extra rows, H], request by request).
    Only when the catch-up fits one forward; a longer one returns None for them.

    A request drafts when the scheduler left it slots and every token before its last has
    been computed (so h_{n-2} exists; always so when its step computes one token, which is
    what the scheduler gives drafting requests)."""
    spec, spans = [], []
    for s in scheduled:
        r = s.request
        end = r.num_computed_tokens
        if s.num_spec_slots <= 0 or end == 0 or end + 1 != r.num_tokens:
            continue
        spec.append(s)
        spans.append((min(kv.covered(r), end - 1), end))
    if not spec:
        return [], None, 0, None
    kv.forget_finished(scheduled)
    extra = [extra_rows(s) for s in spec] if extra_rows is not None else [0] * len(spec)
    # Single-row sequences first (build_forward_batch's order).
    order = sorted(range(len(spec)), key=lambda i: spans[i][1] - spans[i][0] + extra[i] != 1)
    spec = [spec[i] for i in order]
    spans = [spans[i] for i in order]
    extra = [extra[i] for i in order]
    for s in spec:
        kv.record(s.request, s.request.num_computed_tokens)
    total = sum(end - start for start, end in spans)

    def pairs(i: int, start: int, end: int) -> tuple[list[int], int, list[int]]:
        r = spec[i].request
        return r.block_ids, start, r.token_ids[start + 1:end + 1]

    if total + sum(extra) <= max_tokens:   # one forward, the requests' sequences in order
        seqs = [pairs(i, *span) for i, span in enumerate(spans)]
        if not any(extra):
            fb = build_forward_batch(seqs, block_size, device)
            return spec, forward(fb)[fb.logits_indices], total, None
        fb = build_forward_batch([(b, start, ids + [-1] * c) for (b, start, ids), c in zip(seqs, extra)],
                                 block_size, device)
        qsl, n_pairs = fb.query_start_loc, [end - start for start, end in spans]
        last = [qsl[i] + n - 1 for i, n in enumerate(n_pairs)]
        tail = [qsl[i] + n + j for i, (n, c) in enumerate(zip(n_pairs, extra)) for j in range(c)]
        o = forward(fb)
        picked = last + tail
        # One request (batch 1): its last pair and mask rows are consecutive, a slice.
        rows = o[picked[0]:picked[0] + len(picked)] if len(spec) == 1 else o[long_tensor(picked, device)]
        return spec, rows[:len(last)], total, rows[len(last):]
    last = None
    done = [start for start, _ in spans]   # per request, its pairs run so far end here
    while True:
        seqs, owners, room = [], [], max_tokens
        for i, (_, end) in enumerate(spans):
            if done[i] < end and room > 0:
                n = min(end - done[i], room)
                seqs.append(pairs(i, done[i], done[i] + n))
                owners.append(i)
                done[i] += n
                room -= n
        if not seqs:
            return spec, last, total, None
        seq_order = sorted(range(len(seqs)), key=lambda j: len(seqs[j][2]) != 1)
        fb = build_forward_batch([seqs[j] for j in seq_order], block_size, device)
        o = forward(fb)[fb.logits_indices]   # [S, H] each sequence's last row
        if last is None:
            last = o.new_empty((len(spec), o.shape[-1]))
        final = [(row, owners[j]) for row, j in enumerate(seq_order) if done[owners[j]] == spans[owners[j]][1]]
        if final:
            rows, reqs = zip(*final)
            last[long_tensor(list(reqs), device)] = o[long_tensor(list(rows), device)]


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
