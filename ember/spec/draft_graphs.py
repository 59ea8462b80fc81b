"""CUDA graphs for an EAGLE drafter's forwards (ember.engine.cuda_graph's runner, reused).

An EAGLE / P-EAGLE drafter is one decoder layer: run eagerly, its forward is a few dozen
small launches, as long on the host as a graphed step of the whole target. Two of its
forwards have shapes that repeat every step, so they are captured like the target's
decode and verify steps ((batch size, q) shapes, causal [q, q] masks through the tree
kernel, padding rows that write no K/V):

- the catch-up over a request's newly valid pairs (t_{i+1}, fc(aux_i)): q = the tokens
  the last verify step accepted + 1 (1..k + 1), the same for every request at batch 1;
  for P-EAGLE followed, in the same forward, by its k - 1 mask rows (up to 2k rows);
- an EAGLE tree's levels: depth l feeds q = top_k nodes whose [q, w] masks reach over the
  w = top_k (l - 1) nodes fed so far (its ancestors among them); their hidden input (the
  parents' o) goes through a static buffer of the graphed network.

Batches of other shapes (mixed widths, a long first catch-up, a level with fewer
candidates) run eagerly. `DrafterGraphs.run` returns None for those.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ember.engine.cuda_graph import CudaGraphRunner
from ember.engine.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from ember.engine.model_runner import ModelRunner
    from ember.spec.drafting import TargetRows
    from ember.spec.eagle import EagleDrafter
    from ember.spec.tree import TreeShape


def pair_inputs(drafter: EagleDrafter, rows: TargetRows, input_ids: torch.Tensor,  # [T]
                slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [T]
    """The catch-up's inputs: (embedding of t_{i+1}, fc(aux_i) from the kept target rows at
    the pairs' slots), each [T, H]; a P-EAGLE drafter's rows with token id -1 (its mask rows,
    appended by drafting.catch_up) take the learned mask embedding and hidden state instead.
    Padding rows of a graph have slot -1: they read the last row, harmlessly."""
    d = drafter
    embeds = d.embed(input_ids.clamp(min=0) if d.config.parallel else input_ids)
    hidden = d.fuse(rows.rows[slot_mapping])
    if d.config.parallel:
        mask = (input_ids < 0)[:, None]
        embeds = torch.where(mask, d.mask_embed, embeds)
        hidden = torch.where(mask, d.mask_hidden, hidden)
    return embeds, hidden


class CatchUpNet(nn.Module):
    """The catch-up forward (P-EAGLE: with its mask rows) in the target's signature:
    (t_{i+1} ids, positions, fb) -> o."""

    def __init__(self, drafter: EagleDrafter, rows: TargetRows) -> None:
        super().__init__()
        self.drafter, self.rows = drafter, rows

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        d = self.drafter
        return d(*pair_inputs(d, self.rows, input_ids, fb.slot_mapping), positions, d.paged(fb))


class LevelNet(nn.Module):
    """An EAGLE tree level in the target's signature: (fed tokens, positions, fb) -> o, the
    hidden inputs (each fed node's parent's o) read from `hidden_in`, filled before a replay."""

    def __init__(self, drafter: EagleDrafter, max_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.drafter = drafter
        self.hidden_in = torch.zeros((max_tokens, drafter.config.hidden_size), device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        d = self.drafter
        return d(d.embed(input_ids), self.hidden_in[:input_ids.shape[0]], positions, d.paged(fb))


class DrafterGraphs:
    """Captured catch-up (with P-EAGLE's mask rows) and EAGLE tree-level forwards of one
    drafter."""

    def __init__(self, drafter: EagleDrafter, rows: TargetRows, backend, runner: ModelRunner,
                 max_k: int, parallel: bool, tree: TreeShape | None = None,
                 capture_graphs: bool = True) -> None:
        def graphs(net: nn.Module, widths: tuple[int, ...]) -> CudaGraphRunner:
            g = CudaGraphRunner(net, backend, runner.cfg.max_num_seqs, runner.max_model_len,
                                runner.block_size, drafter.config.hidden_size, runner.dtype,
                                runner.device, widths, runner.max_num_batched_tokens, capture_graphs)
            g.capture()
            return g
        top = max(max_k, tree.depth if tree is not None else 0)
        # Pairs: 1..k + 1 (the accepted drafts and the bonus token); P-EAGLE's k - 1 mask rows after them.
        self.catch_up = graphs(CatchUpNet(drafter, rows), tuple(range(2, (2 * top if parallel else top + 1) + 1)))
        self.levels = None
        if tree is not None and not parallel:
            shapes = tuple((tree.top_k, tree.top_k * (level - 1)) for level in range(2, max(tree.depth, max_k) + 1))
            net = LevelNet(drafter, runner.cfg.max_num_seqs * tree.top_k, runner.device, runner.dtype)
            self.levels = graphs(net, shapes)

    @staticmethod
    def run(graphs: CudaGraphRunner | None, fb: ForwardBatch,
            hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """o [T, H] from a captured shape, or None: run this batch eagerly. `hidden` [T, H]:
        the forward's hidden inputs (a LevelNet reads them from its buffer; the other nets
        compute theirs). The rows returned are the runner's static buffer, valid until its
        next replay."""
        key = graphs.key_for(fb) if graphs is not None else None
        if key is None:
            return None
        if isinstance(graphs.model, LevelNet):
            graphs.model.hidden_in[:hidden.shape[0]].copy_(hidden)
        return graphs.run(fb, key)
