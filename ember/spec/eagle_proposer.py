"""Proposers `eagle` (EAGLE-3) and `peagle` (P-EAGLE): chains or EAGLE-2 dynamic trees
from a drafter that reads the target's hidden states (ember.spec.eagle).

Catch-up, lazily. After every target forward the runner's hook hands over the aux
hidden states and their KV slots (a verified tree's accepted rows put in order); the
proposer only copies the rows into `TargetRows` (ember.spec.drafting: one row per slot of
the target's pool, on its block tables), with no drafter forward. `propose`, for the
requests that draft this step only, first runs the drafter over the pairs
(t_{i+1}, fc(aux_i)) from its coverage of the request to its last computed position (the
pairs the last step made valid, or every token since the request last drafted), which
writes its K/V (its own paged cache on the target's block tables) for those positions;
the last pair's output o scores draft 1. A step where no request drafts (adaptive k = 0)
runs no drafter forward.

Chains. EAGLE: draft j + 1 from (d_j, o_j) at the next position, one single-token forward
per draft, each drawn under the request's sampling settings (q recorded for the
verifier). P-EAGLE: drafts 2..k from k - 1 mask rows (the learned mask embedding and
hidden state) at the positions after the last pair, attending causally to the pairs, each
other and the cache; their inputs do not depend on the drafts, so they ride in the
catch-up's own forward (appended to each request's pairs, token id -1: ember.spec.drafting
.catch_up), and that one forward gives every position. A drafting step runs the drafter
once for P-EAGLE (twice when its catch-up needs several forwards: the mask rows then get
one of their own), k times for EAGLE (the catch-up, then one forward per further draft).

Trees (`"tree": {...}`). The scheduler leaves `TreeShape.budget_for(k)` slots; the tree's
depth and node budget follow from them (`TreeShape.for_room`). EAGLE expands a depth per
forward: the top_k best candidates of the last depth (by cumulative draft log-probability)
are fed as (token, its parent's o) at position base + depth, in fresh slots after the
root's, each seeing the cache, its fed ancestors and itself (a tail attention mask); every
drafting request's level goes in one batched forward. P-EAGLE's mask rows already give a
distribution per depth, so its tree is expanded from those (the same children below every
node of a depth: a Medusa-style product tree), with no further forward. Children are the
drafter's top_k under its own distribution (temperature 1: a greedy target still benefits
from second choices); they are deterministic given the drafter's outputs, so the tree
verifier treats each as a one-hot draft and stays exact (ember.spec.tree_rejection).
K/V written for candidates past the cache's valid part is overwritten by the next catch-up.

Device trees. P-EAGLE trees for greedy requests (the tree config's `device_greedy`, on by
default) are chosen on the device from a captured graph (`_tree_tensors`: the best
`budget` nodes of the product tree, ember.spec.device_tree) and verified there by the
runner; the host sees placeholder tokens and reads the accepted ones back once a step.

Host work. Otherwise the trees are built on the host (ember.spec.tree.TreeBuilder, on host lists),
from one topk over all the rows a depth scores, every request's, read back in one copy
(`top_children`): an EAGLE tree step waits for the device once per depth, a P-EAGLE one
once (its roots and mask rows together), whatever the batch and the number of nodes. A
level's inputs (token ids, parent rows, masks) go to the device in non-blocking copies.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from ember.attention.backend import get_attention_backend
from ember.engine.forward_batch import ForwardBatch, long_tensor
from ember.engine.graphed_call import GraphedCall
from ember.engine.model_runner import TargetHiddenStates, build_forward_batch
from ember.engine.scheduler import ScheduledRequest, SchedulerOutput
from ember.spec.device_tree import (
    MAX_CANDIDATES,
    DeviceDraftTree,
    DeviceTrees,
    num_candidates,
    product_tree_tensors,
)
from ember.spec.draft_graphs import DrafterGraphs, pair_inputs
from ember.spec.drafting import (
    ProposerKV,
    TargetRows,
    catch_up,
    draw_drafts,
    state_bytes_per_token,
)
from ember.spec.eagle import load_eagle
from ember.spec.proposer import Proposer
from ember.spec.tree import TreeBuilder, top_children

if TYPE_CHECKING:
    from ember.engine.cuda_graph import CudaGraphRunner
    from ember.engine.engine import Engine
    from ember.engine.model_runner import ModelRunner
    from ember.spec.config import SpeculativeConfig

logger = logging.getLogger("ember")


class EagleProposer(Proposer):
    """EAGLE-3 chains or trees; see the module docstring."""

    name = "eagle"
    needs_hidden_states = True
    parallel = False

    def __init__(self, cfg: SpeculativeConfig, engine: Engine) -> None:
        runner = engine.runner
        if not hasattr(runner.model, "set_aux_hidden_layers"):
            raise ValueError(f"{engine.model_config.architecture} cannot hand its hidden layers to an "
                             f"EAGLE drafter (no set_aux_hidden_layers)")
        if cfg.tree is not None and not getattr(runner.backend, "supports_tree_masks", False):
            raise ValueError(f"the {runner.backend.name} attention backend cannot verify trees; "
                             f"drop \"tree\" to draft chains")
        self.device, self.block_size = runner.device, runner.block_size
        # The drafter is a Llama layer with paged K/V, whatever the target's attention
        # family: its own backend of the configured kind.
        self.backend = get_attention_backend(engine.cfg.attention_backend, runner.device)
        self.vocab_size = engine.model_config.vocab_size
        self.drafter = load_eagle(cfg.model, engine.model_config, self.backend, runner.layer_ops,
                                  runner.device, runner.dtype)
        if self.parallel and not self.drafter.config.parallel:
            raise ValueError(f"{cfg.model} is not a P-EAGLE drafter (no mask embedding); train one "
                             f"with `ember train-eagle --parallel`, or use method \"eagle\"")
        self.drafter.share_embedding(runner.model.model.embed_tokens)
        runner.keep_aux_hidden_states(self.drafter.config.aux_layers)
        cfg_d = self.drafter.config
        self.aux_width = len(cfg_d.aux_layers) * cfg_d.target_hidden_size
        self.source = cfg.model
        self.max_catch_up = runner.max_num_batched_tokens
        self.tree = cfg.tree
        self.max_k = cfg.num_speculative_tokens
        self.graphs: DrafterGraphs | None = None   # captured drafter forwards (CUDA graphs on)
        # P-EAGLE: its mask rows ride in the catch-up's forward (else a forward of their own,
        # as when a catch-up needs several forwards); _tail holds their outputs for the step.
        self.fused = self.parallel
        self._tail: torch.Tensor | None = None

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return state_bytes_per_token(self.drafter.attention_layers(), self.aux_width, dtype)

    def allocate(self, runner: ModelRunner) -> None:
        self.kv = ProposerKV(self.drafter.attention_layers(), runner)
        self.aux = TargetRows(self.aux_width, runner)
        # P-EAGLE's device trees: graphed when the target's steps are.
        self._tree_graphs = GraphedCall(self._tree_tensors, runner.device, runner.graph_runner is not None)
        if runner.graph_runner is not None:   # the target's steps are graphed: the drafter's too
            self.graphs = DrafterGraphs(self.drafter, self.aux, self.backend, runner, self.max_k, self.parallel,
                                        self.tree)
        cfg_d = self.drafter.config
        logger.info("%s drafter %s: draft vocabulary %d, aux layers %s, KV %.1f MiB, aux rows %.1f MiB",
                    self.name, self.source, cfg_d.draft_vocab_size, cfg_d.aux_layers,
                    self.kv.nbytes / 2**20, self.aux.nbytes / 2**20)

    def slots_for(self, k: int) -> int:
        return k if self.tree is None else self.tree.budget_for(k)

    def forwards_for(self, k: int) -> int:
        # The catch-up gives draft 1; P-EAGLE's other positions come from the same forward
        # (its mask rows ride along), EAGLE's from one per draft (chains) or per depth (trees).
        if k <= 1:
            return k
        return 1 if self.fused else k

    # ---- catch-up ---------------------------------------------------------------------------
    def observe_hidden_states(self, step: TargetHiddenStates) -> None:
        """Keep the aux hidden states of every token the step computed (no drafter forward)."""
        self.aux.write(step, step.aux_hidden)

    def _catch_up_forward(self, fb: ForwardBatch) -> torch.Tensor:
        """The drafter over pairs (t_{i+1}, fc(aux_i)), aux_i from the kept rows (and
        P-EAGLE's mask rows, token id -1, after them) -> o [T, H]."""
        o = DrafterGraphs.run(self.graphs and self.graphs.catch_up, fb)
        if o is not None:
            return o
        self.backend.prepare(fb)
        d = self.drafter
        return d(*pair_inputs(d, self.aux, fb.input_ids, fb.slot_mapping), fb.positions, d.paged(fb))

    def _mask_count(self, s: ScheduledRequest) -> int:
        """P-EAGLE: the mask rows request s drafts from (its positions after the first)."""
        depth = s.num_spec_slots if self.tree is None else self.tree.for_room(s.num_spec_slots)[0]
        return max(depth - 1, 0)

    # ---- drafting ---------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, batch: SchedulerOutput) -> None:
        spec, o, self.catch_up_tokens, self._tail = catch_up(
            self.kv, batch.scheduled, self.block_size, self.device, self.max_catch_up,
            self._catch_up_forward, self._mask_count if self.fused else None)
        if not spec:
            return
        # o: [B, H] the output of each request's last pair: it scores draft 1.
        if self.tree is None:
            self._chains(spec, o)
        else:
            self._trees(spec, o)

    def _forward(self, seqs: list[tuple[list[int], int, list[int]]], embeds: torch.Tensor,
                 hidden: torch.Tensor, positions: dict[int, list[int]] | None = None,
                 masks: dict[int, torch.Tensor] | None = None, graphs: CudaGraphRunner | None = None
                 ) -> torch.Tensor:
        """One drafter forward over the paged cache; embeds, hidden: [T, H] -> o [T, H]
        (from `graphs` when they hold the batch's shape and compute the same)."""
        fb = build_forward_batch(seqs, self.block_size, self.device, positions, masks)
        o = DrafterGraphs.run(graphs, fb, hidden)
        if o is not None:
            return o
        self.backend.prepare(fb)
        return self.drafter(embeds, hidden, fb.positions, self.drafter.paged(fb))

    def _mask_outputs(self, spec: list[ScheduledRequest], counts: list[int]) -> torch.Tensor:
        """P-EAGLE: o [sum(counts), H] of counts[i] mask rows for request i (those with
        counts > 0, in order): from the catch-up's forward, or else a forward of their own."""
        return self._tail if self._tail is not None else self._mask_rows(spec, counts)

    def _mask_rows(self, spec: list[ScheduledRequest], counts: list[int]) -> torch.Tensor:
        """P-EAGLE: counts[i] mask rows for request i after its last pair, one forward.
        Returns o [sum(counts), H], request by request."""
        d = self.drafter
        seqs = [(s.request.block_ids, s.request.num_tokens - 1, [0] * c) for s, c in zip(spec, counts)]
        order = sorted(range(len(seqs)), key=lambda i: counts[i] != 1)   # single rows first
        n = sum(counts)
        o = self._forward([seqs[i] for i in order], d.mask_embed.expand(n, -1), d.mask_hidden.expand(n, -1))
        if order == list(range(len(seqs))):
            return o
        start_of, at = {}, 0
        for i in order:
            start_of[i], at = at, at + counts[i]
        return o[long_tensor([start_of[i] + j for i, c in enumerate(counts) for j in range(c)], self.device)]

    def _chains(self, spec: list[ScheduledRequest], o: torch.Tensor) -> None:
        d = self.drafter
        tokens: list[list[int]] = [[] for _ in spec]
        probs: list[list[torch.Tensor]] = [[] for _ in spec]
        active = list(range(len(spec)))
        draw_drafts(spec, active, d.target_logits(o), tokens, probs, self.vocab_size)
        active = [i for i in active if spec[i].num_spec_slots > 1]
        if self.parallel and active:
            counts = [spec[i].num_spec_slots - 1 for i in active]
            logits = d.target_logits(self._mask_outputs([spec[i] for i in active], counts))
            offsets = [sum(counts[:j]) for j in range(len(counts))]
            # Position by position (penalties see earlier drafts): the rows of position j,
            # for every request with more than j of them, made contiguous by one gather.
            now_of = [[a for a, c in enumerate(counts) if c > j] for j in range(max(counts))]
            by_position = logits[long_tensor([offsets[a] + j for j, now in enumerate(now_of) for a in now],
                                             self.device)]
            at = 0
            for now in now_of:
                draw_drafts(spec, [active[a] for a in now], by_position[at:at + len(now)], tokens, probs,
                            self.vocab_size)
                at += len(now)
        else:
            o = o[long_tensor(active, self.device)] if len(active) < len(spec) else o
            while active:
                # (last draft, o) at the position after the last pair's or draft's.
                seqs = [(spec[i].request.block_ids, spec[i].request.num_tokens - 2 + len(tokens[i]),
                         [tokens[i][-1]]) for i in active]
                ids = long_tensor([tokens[i][-1] for i in active], self.device)
                o = self._forward(seqs, d.embed(ids), o)
                draw_drafts(spec, active, d.target_logits(o), tokens, probs, self.vocab_size)
                still = [j for j, i in enumerate(active) if len(tokens[i]) < spec[i].num_spec_slots]
                if still and len(still) < len(active):
                    o = o[long_tensor(still, self.device)]
                active = [active[j] for j in still]
        for s, toks, ps in zip(spec, tokens, probs):
            s.spec_token_ids = toks
            s.spec_probs = torch.stack(ps)   # [k, vocab]

    def _trees(self, spec: list[ScheduledRequest], o: torch.Tensor) -> None:
        shapes = [self.tree.for_room(s.num_spec_slots) for s in spec]   # (depth, budget)
        if self._on_device(spec, shapes):
            self._device_trees(spec, *shapes[0], o)
            return
        root_logq, token_ids = self.drafter.draft_logq(o)   # [B, draft vocab], its target tokens
        if self.parallel:
            builders = self._product_trees(spec, shapes, root_logq, token_ids)
        else:
            builders = [TreeBuilder(kids, self.tree.top_k)
                        for kids in top_children(self.tree.top_k, root_logq, token_ids=token_ids)]
            self._expand_levels(spec, o, shapes, builders)
        for s, b, (_, budget) in zip(spec, builders, shapes):
            tree, _ = b.finish(budget)
            s.spec_tree = tree
            s.spec_token_ids = list(tree.tokens)
            s.spec_probs = None   # deterministic children: one-hot drafts

    def _on_device(self, spec: list[ScheduledRequest], shapes: list[tuple[int, int]]) -> bool:
        """P-EAGLE trees of one shape for greedy requests whose argmax nothing else changes
        (no penalties, min_tokens or logprobs): chosen and verified on the device."""
        depth, budget = shapes[0]
        return (self.parallel and self.tree.device_greedy and all(sh == shapes[0] for sh in shapes)
                and num_candidates(depth, self.tree.top_k) <= MAX_CANDIDATES
                and budget <= num_candidates(depth, self.tree.top_k)
                and all(s.request.params.greedy and s.request.samples_without_history for s in spec))

    def _device_trees(self, spec: list[ScheduledRequest], depth: int, budget: int,
                      o: torch.Tensor) -> None:   # o: [B, H] the roots' drafter outputs
        """Each request's depth d + 2 from its mask row d: the top_k of every depth, and the
        product tree's best `budget` nodes, all on the device (ember.spec.device_tree), from
        a captured graph. The host gets placeholder tokens; the runner puts the real ones in."""
        outputs = [o]
        if depth > 1:
            outputs.append(self._mask_outputs(spec, [depth - 1] * len(spec)))   # [B * (D - 1), H]
        trees = DeviceTrees(*self._tree_graphs(*outputs, top_k=self.tree.top_k, budget=budget), depth=depth)
        for i, s in enumerate(spec):
            s.spec_tree = DeviceDraftTree(trees, i)
            s.spec_token_ids = [0] * budget
            s.spec_probs = None

    def _tree_tensors(self, o_root: torch.Tensor, o_mask: torch.Tensor | None = None, *, top_k: int,
                      budget: int) -> tuple[torch.Tensor, ...]:
        """The roots' [B, H] and mask rows' [B * (D - 1), H] drafter outputs -> the device
        trees' tensors (ember.spec.device_tree.product_tree_tensors)."""
        d, (b, h) = self.drafter, o_root.shape
        o = o_root[:, None] if o_mask is None else torch.cat([o_root[:, None], o_mask.view(b, -1, h)], dim=1)
        logq = d.draft_log_probs(o.reshape(-1, h)).view(b, o.shape[1], -1)   # [B, D, V']
        top = logq.topk(min(top_k, logq.shape[-1]), dim=-1)                   # [B, D, K]
        # A token the draft vocabulary gives q = 0 scores far below any other, not -inf
        # (sums of -inf would tie and lose the candidates' order).
        return product_tree_tensors(top.values.clamp(min=-1e30), d.to_target_ids(top.indices), budget)

    def _product_trees(self, spec: list[ScheduledRequest], shapes: list[tuple[int, int]],
                       root_logq: torch.Tensor,   # [B, draft vocab]
                       token_ids: np.ndarray) -> list[TreeBuilder]:
        """P-EAGLE: each request's depth d + 2 reads its mask row d, whose children hang
        below every fed node of that depth. The root's children and every mask row's come
        back in one top_children (one device sync for the step's trees)."""
        d, top_k = self.drafter, self.tree.top_k
        counts = [depth - 1 for depth, _ in shapes]
        live = [i for i, c in enumerate(counts) if c > 0]
        logq = [root_logq]
        if live:
            rows = self._mask_outputs([spec[i] for i in live], [counts[i] for i in live])
            logq.append(d.draft_logq(rows)[0])   # [sum(counts), draft vocab]
        kids = top_children(top_k, *logq, token_ids=token_ids)   # B root rows, then the mask rows
        builders = [TreeBuilder(kids[i], top_k) for i in range(len(spec))]
        at = len(spec)
        for i in live:
            for level in range(counts[i]):
                fed = builders[i].to_feed()
                if fed:
                    builders[i].expand(fed, [kids[at + level]] * len(fed))
            at += counts[i]
        return builders

    def _expand_levels(self, spec: list[ScheduledRequest], root_o: torch.Tensor,  # root_o: [B, H]
                       shapes: list[tuple[int, int]], builders: list[TreeBuilder]) -> None:
        """EAGLE-2 expansion, a depth per batched drafter forward (see the module docstring).
        A level's inputs are built on the host and go to the device in two non-blocking
        copies (token ids with parent rows; the masks); its children come back in one
        top_children, the level's one device sync.

        A node fed at depth d + 1 is a child of one fed at depth d (only fed nodes have
        children), so its hidden input is a row of the last forward's o, and its mask row
        (over the request's fed nodes, in slot order) is its parent's plus its own slot."""
        d = self.drafter
        prev_o = root_o   # [rows, H] the o of the nodes fed last (the roots at first)
        # Per request: fed node (-1: the root) -> (its row in prev_o, its path's slots).
        prev: list[dict[int, tuple[int, list[int]]]] = [{-1: (i, [])} for i in range(len(spec))]
        num_fed = [0] * len(spec)
        for level in range(2, max(depth for depth, _ in shapes) + 1):
            seqs, positions, masks, tokens, rows, who = [], {}, [], [], [], []
            for i, (s, b) in enumerate(zip(spec, builders)):
                fed = b.to_feed() if shapes[i][0] >= level else []
                if not fed:
                    continue
                cand, r, start = b.cand, s.request, num_fed[i]
                num_fed[i] += len(fed)
                parents = [prev[i][cand.parents[c]] for c in fed]
                paths = [path + [start + j] for j, (_, path) in enumerate(parents)]
                mask = np.zeros((len(fed), num_fed[i]), dtype=bool)   # the fed ancestors and the node
                for j, path in enumerate(paths):
                    mask[j, path] = True
                positions[len(seqs)] = [r.num_tokens - 2 + cand.depths[c] for c in fed]
                masks.append(mask)
                # Fed nodes take the slots from the root's own position on: N - 1, N, ...
                seqs.append((r.block_ids, r.num_tokens - 1 + start, [cand.tokens[c] for c in fed]))
                tokens += seqs[-1][2]
                rows += [row for row, _ in parents]
                who.append((i, fed, paths))
            if not seqs:
                break
            ids, parent_rows = long_tensor([tokens, rows], self.device)
            o = self._forward(seqs, d.embed(ids), prev_o[parent_rows], positions, self._device_masks(masks),
                              graphs=self.graphs and self.graphs.levels)
            logq, token_ids = d.draft_logq(o)
            kids = top_children(self.tree.top_k, logq, token_ids=token_ids)
            at = 0
            for i, fed, paths in who:
                builders[i].expand(fed, kids[at:at + len(fed)])
                prev[i] = {c: (at + j, path) for j, (c, path) in enumerate(zip(fed, paths))}
                at += len(fed)
            prev_o = o

    def _device_masks(self, masks: list[np.ndarray]) -> dict[int, torch.Tensor]:
        """Host [n_i, w_i] bool masks -> sequence index -> device views of one copy."""
        flat = torch.from_numpy(np.concatenate([m.ravel() for m in masks])).to(self.device, non_blocking=True)
        out, at = {}, 0
        for j, m in enumerate(masks):
            out[j] = flat[at:at + m.size].view(m.shape)
            at += m.size
        return out


class PEagleProposer(EagleProposer):
    """P-EAGLE: every draft position after the first from one drafter forward."""

    name = "peagle"
    parallel = True
