"""Turns a scheduled step into one forward pass and a sampler call."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ember.cache.kv_spec import (
    KVCacheSpec,
    allocate_kv_caches,
    kv_bytes_per_token,
    kv_stack,
)
from ember.config import EngineConfig, ModelConfig
from ember.engine.cuda_graph import CudaGraphRunner
from ember.engine.forward_batch import ForwardBatch, long_tensor
from ember.engine.graphed_call import GraphedCall
from ember.engine.scheduler import ScheduledRequest, SchedulerOutput
from ember.layers.layer_ops import get_layer_ops
from ember.layers.sampler import (
    RowLogprobs,
    Sampler,
    SamplerOutput,
    SamplingBatch,
    SamplingRow,
    compute_token_logprobs,
    greedy_tokens,
    sampling_probs,
)
from ember.models.loader import ModelSource, build_model
from ember.models.registry import attention_backend_for
from ember.spec.device_tree import (
    DeviceDraftTree,
    greedy_verdict_tensors,
    place_device_trees,
    tree_rows_contiguous,
)
from ember.spec.rejection import VerifyOutput, greedy_verify, rejection_sample
from ember.spec.tree import ancestor_mask_np, tree_step_mask
from ember.spec.tree_rejection import tree_rejection_sample

logger = logging.getLogger("ember")
GiB = 1 << 30


@dataclass
class StepResult:
    """Per request id: the new tokens (one, or 1..k+1 for a speculating request), their
    logprobs (if asked), new prompt logprobs (if asked), and accepted draft counts."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[RowLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[RowLogprobs]] = field(default_factory=dict)
    num_accepted: dict[str, int] = field(default_factory=dict)   # speculating requests only


class LaunchedStep:
    """A step queued on the device. Resolved steps carry their StepResult; deferred ones
    (async scheduling) carry the sampled tokens on the device (the next step's pending
    inputs) and their copy on the host, ready once `done` has fired."""

    def __init__(self, batch: SchedulerOutput, request_ids: list[str] | None = None,
                 sampled_ids: torch.Tensor | None = None, host_ids: torch.Tensor | None = None,
                 done: torch.cuda.Event | None = None, result: StepResult | None = None) -> None:
        self.batch = batch
        self.request_ids = request_ids or []
        self.sampled_ids = sampled_ids                     # [num_sampling] long, on the device
        self.sample_row = {rid: i for i, rid in enumerate(self.request_ids)}
        self._host_ids, self._done, self._result = host_ids, done, result

    @property
    def deferred(self) -> bool:
        """True while the step's tokens have not been brought back to the host."""
        return self._result is None

    def resolve(self) -> StepResult:
        """Wait for the step's tokens (deferred steps) and return its result."""
        if self._result is None:
            if self._done is not None:
                self._done.synchronize()
            tokens = self._host_ids.tolist()
            self._result = StepResult(sampled={rid: [t] for rid, t in zip(self.request_ids, tokens)})
        return self._result


@dataclass
class TargetHiddenStates:
    """One step's target hidden states, for proposers that read them (MTP, EAGLE), and the
    KV slot of each row's position. Handed over on the device only, so that a deferred
    step (async scheduling) gives them at launch, without waiting for anything: then the
    rows are its requests' own tokens; a resolved step gives them after verification (a
    verified tree's accepted nodes moved into the rows a chain would have had). Every row
    stands except those of rejected drafts, whose positions lie past the request's
    computed tokens, as their K/V does, and are computed again before anything reads them."""

    hidden: torch.Tensor                # [T, hidden] the model's forward output (after its final norm)
    slot_mapping: torch.Tensor          # [T] long, on the device: each row's position's KV slot
    # [T, n_aux * hidden] the residual streams the model keeps on request (EAGLE-3:
    # ModelRunner.keep_aux_hidden_states), else None. Rows as `hidden`'s.
    aux_hidden: torch.Tensor | None = None


def build_forward_batch(seqs: list[tuple[list[int], int, list[int]]], block_size: int,
                        device: torch.device, positions: dict[int, list[int]] | None = None,
                        attn_masks: dict[int, torch.Tensor] | None = None) -> ForwardBatch:
    """Host-side step inputs, then three device copies in all (token data, per-sequence
    data, block tables).

    seqs: per sequence (block_ids, first slot position, token ids to compute), single-query
    sequences first (unmasked ones: a masked sequence never takes the decode path).
    logits_indices holds each sequence's last row. Single-query sequences
    go through plain lists, longer ones through numpy: each the cheaper at its size.
    Tree sequences (ember.spec.tree) give their own RoPE `positions` (sequence index ->
    one per token; their K/V still takes consecutive slots from the first position) and
    `attn_masks` (sequence index -> [n, w] bool, see ForwardBatch.attn_masks).
    """
    bs = block_size
    num_tokens = sum(len(t) for _, _, t in seqs)
    tokens = np.empty((3, num_tokens), dtype=np.int64)  # input ids, positions, slots
    one_ids, one_pos, one_slots = [], [], []
    qsl, seq_lens, last = [0], [], []
    max_blocks = max(len(b) for b, _, _ in seqs)
    tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
    for i, (blocks, start, ids) in enumerate(seqs):
        n = len(ids)
        if n == 1 and (attn_masks is None or i not in attn_masks):   # masked ones never decode
            one_ids.append(ids[0])
            one_pos.append(start)
            one_slots.append(blocks[start // bs] * bs + start % bs)
        else:
            p = np.arange(start, start + n)
            span = slice(qsl[-1], qsl[-1] + n)
            tokens[0, span] = ids
            tokens[1, span] = p if positions is None or i not in positions else positions[i]
            tokens[2, span] = np.asarray(blocks, dtype=np.int64)[p // bs] * bs + p % bs
        tables[i, :len(blocks)] = blocks
        qsl.append(qsl[-1] + n)
        seq_lens.append(start + n)
        last.append(qsl[-1] - 1)
    nd = len(one_ids)
    if nd:
        tokens[:, :nd] = (one_ids, one_pos, one_slots)
    tokens_d = torch.from_numpy(tokens).to(device, non_blocking=True)  # [3, T]
    per_seq = torch.from_numpy(np.array((seq_lens, last), dtype=np.int64)).to(device, non_blocking=True)
    return ForwardBatch(
        input_ids=tokens_d[0], positions=tokens_d[1], slot_mapping=tokens_d[2], query_start_loc=qsl,
        seq_lens=per_seq[0], seq_lens_list=seq_lens,
        block_tables=torch.from_numpy(tables).to(device, non_blocking=True),
        num_decodes=nd, logits_indices=per_seq[1], block_size=bs,
        attn_masks=None if not attn_masks else [attn_masks.get(i) for i in range(len(seqs))],
        token_data=tokens_d)


def tree_layout(trees: dict[int, ScheduledRequest]
                ) -> tuple[dict[int, list[int]] | None, dict[int, torch.Tensor] | None]:
    """RoPE positions and attention masks of the sequences that verify a draft tree: the
    request's own tokens (causal), then each node at the position after its parent's (its
    depth past the last own token), seeing the own tokens and its ancestors. Host trees'
    masks are built on the host (the backend, or the graph runner, copies all of them at
    once); device trees' on the device, and their nodes' positions are placeholders
    (`place_device_trees` writes them)."""
    if not trees:
        return None, None
    positions, masks = {}, {}
    for i, s in trees.items():
        t, own = s.spec_tree, s.num_new_tokens
        start = s.request.num_computed_tokens
        if isinstance(t, DeviceDraftTree):
            positions[i] = list(range(start, start + own)) + [start + own] * t.num_nodes
            masks[i] = t.trees.step_masks[t.row] if own == 1 else tree_step_mask(t.trees.ancestors[t.row], own)
            continue
        positions[i] = list(range(start, start + own)) + [start + own - 1 + d for d in t.depths]
        n = own + t.num_nodes
        m = np.zeros((n, n), dtype=bool)
        m[:own, :own] = np.tri(own, dtype=bool)
        m[own:, :own] = True
        m[own:, own:] = ancestor_mask_np(t.parents)
        masks[i] = torch.from_numpy(m)
    return positions, masks


class ModelRunner:
    """Owns the model, the KV pool and the sampler on one device."""

    def __init__(self, cfg: EngineConfig, source: ModelSource, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.cfg = cfg
        self.model_config: ModelConfig = source.config
        self.device = device
        self.dtype = dtype
        self.block_size = cfg.block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        # The model's family (paged K/V, or MLA's latent cache) in the chosen implementation.
        self.backend = attention_backend_for(source.config, cfg.attention_backend, device)
        self.layer_ops = get_layer_ops(cfg.layer_kernels, device)
        self.model = build_model(source, self.backend, device, dtype, cfg.seed, self.layer_ops)
        self.sampler = Sampler()
        # Set by the speculator when its proposer reads the target's hidden states; None
        # (the default) costs nothing.
        self.hidden_states_hook: Callable[[TargetHiddenStates], None] | None = None
        self.graph_runner: CudaGraphRunner | None = None
        self.num_blocks = 0          # allocate_kv_cache() sizes and allocates the pool
        self.kv_caches: list[torch.Tensor] = []
        self._kv_specs: list[KVCacheSpec] = []   # each cache's layout
        self.kv_stack: torch.Tensor | None = None   # the caches' one [L, ...] allocation, when they share one
        # Device-tree verdicts (ember.spec.device_tree); graphed once the steps are.
        self._verdict_graphs = GraphedCall(self._device_verdict, device, capture=False)

    def allocate_kv_cache(self, extra_bytes_per_token: int = 0, verify_widths: tuple[int, ...] = ()) -> None:
        """Size the KV pool and allocate it, then capture the CUDA graphs (decode, and the
        verify steps of `verify_widths` query tokens per sequence). Called once the
        proposer's networks exist (their weights then count in the CUDA budget), with
        `extra_bytes_per_token` the per-slot state the proposer keeps beside the pool (its
        own K/V, the target rows it reads), which the pool's size must leave room for."""
        self.num_blocks = self._choose_num_blocks(extra_bytes_per_token)
        mc = self.model_config
        # Each layer's cache is shaped as the model says (its KVCacheSpec).
        self.kv_caches = allocate_kv_caches(self.model.attention_layers(), self.num_blocks,
                                            self.block_size, self.dtype, self.device)
        self.kv_stack = kv_stack(self.kv_caches)
        self._kv_specs = [layer.kv_cache_spec(c.dtype) for layer, c in zip(self.model.attention_layers(), self.kv_caches)]
        if self.device.type == "cuda" and not self.cfg.enforce_eager and self.backend.supports_cuda_graphs:
            self.graph_runner = CudaGraphRunner(self.model, self.backend, self.cfg.max_num_seqs,
                                                self.max_model_len, self.block_size, mc.hidden_size,
                                                self.dtype, self.device, verify_widths,
                                                self.max_num_batched_tokens)
            self.graph_runner.capture()
        self._verdict_graphs = GraphedCall(self._device_verdict, self.device, self.graph_runner is not None)
        logger.info("KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB; proposer state beside "
                    "it %.2f GiB)", self.num_blocks, self.block_size, self.num_blocks * self.block_size,
                    self.num_blocks * self._block_bytes() / GiB,
                    self.num_blocks * self.block_size * extra_bytes_per_token / GiB)

    def keep_aux_hidden_states(self, layers: tuple[int, ...]) -> None:
        """Have the model keep the residual stream entering `layers` after every forward
        (model.model.aux_hidden_states; an EAGLE-3 drafter reads them), CUDA graphs
        included (they are captured again)."""
        self.model.set_aux_hidden_layers(layers)
        if self.graph_runner is not None:
            self.graph_runner.capture()

    # ---- sizing -------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        return self.block_size * kv_bytes_per_token(self.model.attention_layers(), self.dtype)

    def _choose_num_blocks(self, extra_bytes_per_token: int = 0) -> int:
        if self.cfg.num_kv_blocks is not None:
            return self.cfg.num_kv_blocks
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = (self.cfg.kv_cache_memory if self.cfg.kv_cache_memory is not None else 1.0) * GiB
        # No point holding more than every sequence at full length.
        useful = self.cfg.max_num_seqs * -(-self.max_model_len // self.block_size)
        per_block = self._block_bytes() + self.block_size * extra_bytes_per_token
        return max(1, min(int(budget // per_block), useful))

    def _cuda_kv_budget(self) -> float:
        """Memory the card can give the pool: its share of the card, less the weights and
        the peak activations of a forward at the full token budget (measured, not guessed)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # One block per layer, in the model's own layout: every slot below points at it.
        scratch = allocate_kv_caches(self.model.attention_layers(), 1, self.block_size,
                                     self.dtype, self.device)
        n = self.max_num_batched_tokens
        fb = ForwardBatch(
            input_ids=torch.zeros(n, dtype=torch.long, device=self.device),
            positions=torch.arange(n, device=self.device) % self.max_model_len,
            slot_mapping=torch.zeros(n, dtype=torch.long, device=self.device),
            query_start_loc=[0, n], seq_lens=torch.tensor([n], device=self.device),
            seq_lens_list=[n],
            block_tables=torch.zeros((1, -(-n // self.block_size)), dtype=torch.int32, device=self.device),
            num_decodes=0, logits_indices=torch.arange(min(n, self.cfg.max_num_seqs), device=self.device),
            block_size=self.block_size)
        with torch.inference_mode():
            self.backend.prepare(fb)
            hidden = self.model(fb.input_ids, fb.positions, fb)
            self.model.compute_logits(hidden[fb.logits_indices])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del scratch, hidden
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        return total * self.cfg.gpu_memory_utilization - peak - max(used_by_others, 0)

    # ---- one step -----------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one step to the end: forward, sampling / verification, tokens on the host."""
        return self.launch(out).resolve()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None,
               defer: bool = False) -> LaunchedStep:
        """Queue one step on the device. With `defer`, a step whose sampling rows all
        sample without history (Request.samples_without_history; no drafts, no prompt
        logprobs) returns before its tokens reach the host: they are copied back
        asynchronously and `resolve()` waits for them. Any other step is resolved here.
        `previous` is the step in flight, whose sampled tokens on the device are this
        step's pending inputs (ScheduledRequest.num_pending_inputs). The hidden-state hook
        gets a deferred step's rows at once, a resolved step's after verification."""
        # Single-query sequences first: the attention backend batches them.
        scheduled = sorted(out.scheduled, key=lambda s: s.num_query_tokens != 1)
        trees = {i: s for i, s in enumerate(scheduled) if s.spec_tree is not None}
        if trees and not getattr(self.backend, "supports_tree_masks", False):
            raise RuntimeError(f"the {self.backend.name} attention backend cannot verify draft trees")
        positions, masks = tree_layout(trees)
        fb = build_forward_batch([(s.request.block_ids, s.start, s.query_token_ids) for s in scheduled],
                                 self.block_size, self.device, positions, masks)
        contiguous = tree_rows_contiguous(trees, fb.num_seqs)   # a step of [B, N + 1] device-tree rows
        place_device_trees(trees, fb, contiguous)
        self._fill_pending_inputs(scheduled, fb, previous)
        key = self.graph_runner.key_for(fb) if self.graph_runner is not None else None
        if key is not None:
            hidden = self.graph_runner.run(fb, key)
        else:
            self.backend.prepare(fb)
            hidden = self.model(fb.input_ids, fb.positions, fb)
        sampling = [i for i, s in enumerate(scheduled) if s.samples and not s.spec_token_ids]
        if defer and self._deferrable(scheduled, sampling):
            self._hand_hidden_states(fb, hidden)
            return self._launch_sampling(out, scheduled, sampling, fb, hidden)
        result = StepResult()
        verifying = [i for i, s in enumerate(scheduled) if s.samples and s.spec_token_ids]
        chains = [i for i in verifying if i not in trees]
        if chains:
            self._verify([scheduled[i] for i in chains],
                         [fb.query_start_loc[i + 1] for i in chains], hidden, result)
        if trees:
            spec, ends = [scheduled[i] for i in trees], [fb.query_start_loc[i + 1] for i in trees]
            if all(isinstance(s.spec_tree, DeviceDraftTree) for s in spec):
                self._verify_device_trees(spec, ends, fb, hidden, result, contiguous)
            else:
                self._verify_trees(spec, ends, fb, hidden, result)
        if sampling:
            sampler_out, reqs = self._sample(scheduled, sampling, fb, hidden)
            tokens = sampler_out.sampled_token_ids.tolist()
            for r, tok, lp in zip(reqs, tokens, sampler_out.row_logprobs()):
                result.sampled[r.request_id] = [tok]
                if lp is not None:
                    result.logprobs[r.request_id] = [lp]
        self._prompt_logprobs(scheduled, fb, hidden, result)
        self._hand_hidden_states(fb, hidden)
        return LaunchedStep(out, result=result)

    def _deferrable(self, scheduled: list[ScheduledRequest], sampling: list[int]) -> bool:
        return (len(sampling) > 0
                and all(not s.spec_token_ids and s.request.prompt_logprobs is None for s in scheduled)
                and all(scheduled[i].request.samples_without_history for i in sampling))

    def _hand_hidden_states(self, fb: ForwardBatch, hidden: torch.Tensor) -> None:
        """The hidden-state hook, if set: device tensors only, nothing read back."""
        if self.hidden_states_hook is not None:
            aux = getattr(self.model.model, "aux_hidden_states", None)
            self.hidden_states_hook(TargetHiddenStates(hidden, fb.slot_mapping, aux))

    def _fill_pending_inputs(self, scheduled: list[ScheduledRequest], fb: ForwardBatch,
                             previous: LaunchedStep | None) -> None:
        """Put the tokens the step in flight samples (still on the device) into this step's
        input ids: device to device, so the host never waits for them."""
        pending = [(fb.query_start_loc[i], s.request.request_id)
                   for i, s in enumerate(scheduled) if s.num_pending_inputs]
        if not pending:
            return
        if previous is None or previous.sampled_ids is None:
            raise RuntimeError("a scheduled token is pending but no step is in flight")
        rows = previous.sample_row
        dst = [d for d, _ in pending]
        src = [rows[rid] for _, rid in pending]
        n = len(pending)
        if dst == src == list(range(n)):   # the usual decode batch: same requests, same order
            fb.input_ids[:n].copy_(previous.sampled_ids[:n])
            return
        index = torch.from_numpy(np.array((dst, src), dtype=np.int64)).to(self.device, non_blocking=True)
        fb.input_ids[index[0]] = previous.sampled_ids[index[1]]

    def _sample(self, scheduled: list[ScheduledRequest], sampling: list[int], fb: ForwardBatch,
                hidden: torch.Tensor) -> tuple[SamplerOutput, list]:
        """Logits of the sampling rows and one sampler call (queued; nothing read back)."""
        # Index with a device tensor only when some rows don't sample (indexing with a
        # host list would copy it over and wait for the forward).
        if len(sampling) == len(scheduled) == hidden.shape[0]:
            h = hidden   # a pure decode step: every row samples, in order (no gather)
        elif len(sampling) == len(scheduled):
            h = hidden[fb.logits_indices]
        else:
            h = hidden[fb.logits_indices[torch.tensor(sampling).to(self.device, non_blocking=True)]]
        logits = self.model.compute_logits(h)
        reqs = [scheduled[i].request for i in sampling]
        rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator,
                            r.eos_token_ids) for r in reqs]
        batch = SamplingBatch.build(rows, logits.shape[-1], self.device)
        return self.sampler(logits, batch), reqs

    def _launch_sampling(self, out: SchedulerOutput, scheduled: list[ScheduledRequest],
                         sampling: list[int], fb: ForwardBatch, hidden: torch.Tensor) -> LaunchedStep:
        """Queue the sampler and an asynchronous copy of its tokens to the host."""
        sampler_out, reqs = self._sample(scheduled, sampling, fb, hidden)
        ids = sampler_out.sampled_token_ids
        if self.device.type != "cuda":
            return LaunchedStep(out, [r.request_id for r in reqs], ids, ids, None)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(out, [r.request_id for r in reqs], ids, host, done)

    def _verify(self, spec: list[ScheduledRequest], ends: list[int], hidden: torch.Tensor,
                result: StepResult) -> None:
        """Score every draft position of the speculating requests and run the verifier.

        Request i's k drafts sit in the rows just before ends[i]; the row of its last own
        token scores draft 0, draft j's row scores draft j + 1 (or the bonus token). The
        target distribution at draft position j is the sampler's with drafts 0..j-1 as
        output, so penalties and min_tokens see exactly what plain decoding would.
        """
        width = max(len(s.spec_token_ids) for s in spec) + 1   # K + 1 positions, padded
        rows, srows = [], []
        for s, end in zip(spec, ends):
            r, k = s.request, len(s.spec_token_ids)
            out_ids = r.output_token_ids
            history = not r.samples_without_history   # else the output is never read: no copies
            for j in range(width):
                jj = min(j, k)   # padding repeats the last real position
                rows.append(end - 1 - k + jj)
                srows.append(SamplingRow(r.params, r.prompt_token_ids,
                                         out_ids + s.spec_token_ids[:jj] if history else out_ids,
                                         r.generator, r.eos_token_ids))
        logits = self.model.compute_logits(hidden[long_tensor(rows, self.device)])
        vocab = logits.shape[-1]
        sb = SamplingBatch.build(srows, vocab, self.device)
        probs = sampling_probs(logits, sb)
        probs = probs.view(len(spec), width, vocab)                    # [B, K+1, vocab]
        if sb.all_greedy:
            out = greedy_verify(probs.argmax(dim=-1).tolist(), [s.spec_token_ids for s in spec])
            self._chain_results(spec, out, logits, width, result)
            return
        drafts = torch.zeros((len(spec), width - 1), dtype=torch.long)
        for i, s in enumerate(spec):
            drafts[i, :len(s.spec_token_ids)] = torch.tensor(s.spec_token_ids)
        q = None
        if any(s.spec_probs is not None for s in spec):
            q = torch.zeros((len(spec), width - 1, vocab), device=self.device)  # [B, K, vocab]
            for i, s in enumerate(spec):
                k = len(s.spec_token_ids)
                if s.spec_probs is not None:
                    q[i, :k] = s.spec_probs
                else:
                    q[i, torch.arange(k), drafts[i, :k]] = 1.0
        out = rejection_sample(probs, drafts.to(self.device), [len(s.spec_token_ids) for s in spec],
                               q, [s.request.generator for s in spec])
        self._chain_results(spec, out, logits, width, result)

    def _chain_results(self, spec: list[ScheduledRequest], out: VerifyOutput, logits: torch.Tensor,
                       width: int, result: StepResult) -> None:
        """The verified chains' tokens (and logprobs) into the step's result."""
        for i, (s, tokens) in enumerate(zip(spec, out.token_ids)):
            rid = s.request.request_id
            result.sampled[rid] = tokens
            result.num_accepted[rid] = out.num_accepted[i]
            n_top = s.request.params.logprobs
            if n_top is not None:
                lg = logits[i * width:i * width + len(tokens)]   # the emitted positions
                lp = compute_token_logprobs(lg, torch.tensor(tokens, device=self.device), n_top)
                result.logprobs[rid] = lp.to_rows()

    def _verify_trees(self, spec: list[ScheduledRequest], ends: list[int], fb: ForwardBatch,
                      hidden: torch.Tensor, result: StepResult) -> None:
        """Verify draft trees (ember.spec.tree_rejection) and move the accepted path into
        place: the accepted nodes' K/V (in every layer) and hidden rows go to the slots and
        rows a chain of them would have had, so the request's cache stays consecutive and
        the rest is rolled back like rejected chain drafts.

        Request i's nodes are the n rows before ends[i], its last own token's row (the
        root) just before them. The target's distribution at a node counts the path to
        it as output (penalties, min_tokens), as at a chain position."""
        width = max(s.spec_tree.num_nodes for s in spec) + 1
        rows, srows = [], []
        for s, end in zip(spec, ends):
            r, t = s.request, s.spec_tree
            n = t.num_nodes
            out_ids = r.output_token_ids
            history = not r.samples_without_history   # else the output is never read: no copies
            for j in range(width):
                node = min(j, n) - 1                     # -1: the root; padding repeats the last node
                rows.append(end - 1 - n + node + 1)
                path = [t.tokens[x] for x in t.path(node)] if node >= 0 and history else []
                srows.append(SamplingRow(r.params, r.prompt_token_ids, out_ids + path if history else out_ids,
                                         r.generator, r.eos_token_ids))
        logits = self.model.compute_logits(hidden[long_tensor(rows, self.device)])
        vocab = logits.shape[-1]
        sb = SamplingBatch.build(srows, vocab, self.device)
        probs = sampling_probs(logits, sb)
        out = tree_rejection_sample(probs.view(len(spec), width, vocab), [s.spec_tree for s in spec],
                                    None, [s.request.generator for s in spec], greedy=sb.all_greedy)
        src: list[int] = []
        dst: list[int] = []
        for i, (s, end, tokens, nodes) in enumerate(zip(spec, ends, out.token_ids, out.accepted_nodes)):
            rid = s.request.request_id
            result.sampled[rid] = tokens
            result.num_accepted[rid] = len(nodes)
            first = end - s.spec_tree.num_nodes                        # row of node 0
            moves = [(first + a, first + j) for j, a in enumerate(nodes) if a != j]
            src += [a for a, _ in moves]
            dst += [b for _, b in moves]
            n_top = s.request.params.logprobs
            if n_top is not None:
                # Emitted token j was scored at the root (j = 0) or at accepted node j - 1.
                at = [i * width] + [i * width + 1 + a for a in nodes]
                lp = compute_token_logprobs(logits[torch.tensor(at, device=self.device)],
                                            torch.tensor(tokens, device=self.device), n_top)
                result.logprobs[rid] = lp.to_rows()
        if src:
            src_t, dst_t = long_tensor([src, dst], self.device)
            self._move_rows(src_t, dst_t, fb, hidden)

    def _verify_device_trees(self, spec: list[ScheduledRequest], ends: list[int], fb: ForwardBatch,
                             hidden: torch.Tensor, result: StepResult, contiguous: bool) -> None:
        """Greedy verification of device trees (ember.spec.device_tree), the accepted paths
        moved into place, all on the device; one read-back for the emitted tokens.
        `contiguous` (tree_rows_contiguous): the step's rows are [B, N + 1] from row 0."""
        trees = spec[0].spec_tree.trees
        n = trees.num_nodes
        if contiguous:
            packed, src, dst = self._verdict_graphs(hidden[:len(spec) * (n + 1)], trees.tokens, trees.parents,
                                                    trees.depths, trees.ancestors, depth=trees.depth)
        else:
            which = [s.spec_tree.row for s in spec]
            roots = long_tensor([[e - 1 - n for e in ends], which], self.device)
            root_rows, which_t = roots[0], roots[1]
            if which != list(range(trees.tokens.shape[0])):
                trees = trees.rows(which_t)
            rows = root_rows[:, None] + torch.arange(n + 1, device=self.device)   # [B, N + 1]: root, nodes
            packed, src, dst = self._verdict_graphs(hidden[rows.reshape(-1)], trees.tokens, trees.parents,
                                                    trees.depths, trees.ancestors, root_rows, depth=trees.depth)
        self._move_rows(src, dst, fb, hidden)
        host = packed.tolist()
        for s, (deepest, n_acc, *emitted) in zip(spec, host):
            rid = s.request.request_id
            result.sampled[rid] = emitted[:n_acc + 1]
            result.num_accepted[rid] = n_acc
            s.spec_tree.deepest = deepest

    def _device_verdict(self, hidden_rows: torch.Tensor,   # [B * (N + 1), H] each tree's root and node rows
                        tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                        ancestors: torch.Tensor, root_rows: torch.Tensor | None = None, *, depth: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target's argmax at every row and device_tree.greedy_verdict_tensors (graphed).
        root_rows [B]: each tree's root row in the step; None: the rows are [B, N + 1]."""
        b, n = tokens.shape
        if root_rows is None:
            root_rows = torch.arange(b, device=tokens.device) * (n + 1)
        target = greedy_tokens(self.model.compute_logits(hidden_rows)).view(b, -1)
        return greedy_verdict_tensors(target, tokens, parents, depths, ancestors, root_rows, depth)

    def _move_rows(self, src_t: torch.Tensor, dst_t: torch.Tensor, fb: ForwardBatch,
                   hidden: torch.Tensor) -> None:
        """Copy the K/V of forward rows src_t to the slots of rows dst_t ([n] long, same
        request each), in every layer, and the hidden rows likewise (and the aux hidden
        states, when the model keeps them). A destination never comes after its source and
        the accepted nodes are in order, so reading all sources first makes the copy safe."""
        src_slots, dst_slots = fb.slot_mapping[src_t], fb.slot_mapping[dst_t]
        if self.kv_stack is not None:   # every layer's K/V in one copy
            self._kv_specs[0].copy_slots(self.kv_stack, src_slots, dst_slots)
        else:
            for spec, cache in zip(self._kv_specs, self.kv_caches):
                spec.copy_slots(cache, src_slots, dst_slots)
        hidden[dst_t] = hidden[src_t]
        aux = getattr(self.model.model, "aux_hidden_states", None)
        if aux is not None and aux.shape[0] == hidden.shape[0]:
            aux[dst_t] = aux[src_t]

    def _prompt_logprobs(self, scheduled: list[ScheduledRequest], fb: ForwardBatch,
                         hidden: torch.Tensor, result: StepResult) -> None:
        """Score each prompt token of this chunk given the tokens before it."""
        for i, s in enumerate(scheduled):
            r = s.request
            if r.prompt_logprobs is None:
                continue
            start = r.num_computed_tokens
            # Positions p in the chunk score prompt token p + 1; skip those scored before
            # (a request recomputed after preemption).
            first = max(start, len(r.prompt_logprobs) - 1)
            stop = min(start + s.num_new_tokens, r.num_prompt_tokens - 1)
            if first >= stop:
                continue
            rows = torch.arange(first - start, stop - start, device=self.device) + fb.query_start_loc[i]
            logits = self.model.compute_logits(hidden[rows])
            targets = torch.tensor(r.prompt_token_ids[first + 1:stop + 1], device=self.device)
            lp = compute_token_logprobs(logits, targets, r.params.prompt_logprobs)
            result.prompt_logprobs[r.request_id] = lp.to_rows()
