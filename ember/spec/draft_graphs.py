"""CUDA graphs for an EAGLE drafter's forwards (ember.engine.cuda_graph's runner, reused).

An EAGLE / P-EAGLE drafter is one decoder layer: run eagerly, its forward is a few dozen
small launches, as long on the host as a graphed step of the whole target. Two of its
forwards have shapes that repeat every step, so they are captured like the target's
decode and verify steps ((batch size, q) shapes, causal [q, q] masks through the tree
kernel, padding rows that write no K/V):

- the catch-up over a request's newly valid pairs (t_{i+1}, fc(aux_i)): q = the tokens
  the last verify step accepted + 1 (1..k + 1), the same for every request at batch 1;
- P-EAGLE's mask rows: q = the drafts after the first (k - 1, the same for every request
  of a step).

Batches of other shapes (mixed widths, a long first catch-up, EAGLE's tree levels, whose
masks reach past their own rows) run eagerly. `DrafterGraphs.run` returns None for those.
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


class CatchUpNet(nn.Module):
    """The catch-up forward in the target's signature: (t_{i+1} ids, positions, fb) -> o,
    fc(aux_i) read from the kept target rows at the pairs' slots."""

    def __init__(self, drafter: EagleDrafter, rows: TargetRows) -> None:
        super().__init__()
        self.drafter, self.rows = drafter, rows

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        d = self.drafter
        # Padding rows have slot -1: they read the last row, harmlessly.
        return d(d.embed(input_ids), d.fuse(self.rows.rows[fb.slot_mapping]), positions, d.paged(fb))


class MaskRowsNet(nn.Module):
    """P-EAGLE's mask rows in the target's signature (the ids are unused: every row is the
    learned mask embedding and hidden state)."""

    def __init__(self, drafter: EagleDrafter) -> None:
        super().__init__()
        self.drafter = drafter

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        d, t = self.drafter, input_ids.shape[0]
        return d(d.mask_embed.expand(t, -1), d.mask_hidden.expand(t, -1), positions, d.paged(fb))


class DrafterGraphs:
    """Captured catch-up (and P-EAGLE mask-row) forwards of one drafter."""

    def __init__(self, drafter: EagleDrafter, rows: TargetRows, backend, runner: ModelRunner,
                 max_k: int, parallel: bool, capture_graphs: bool = True) -> None:
        def graphs(net: nn.Module, widths: tuple[int, ...]) -> CudaGraphRunner:
            g = CudaGraphRunner(net, backend, runner.cfg.max_num_seqs, runner.max_model_len,
                                runner.block_size, drafter.config.hidden_size, runner.dtype,
                                runner.device, widths, runner.max_num_batched_tokens, capture_graphs)
            g.capture()
            return g
        self.catch_up = graphs(CatchUpNet(drafter, rows), tuple(range(2, max_k + 2)))
        self.mask_rows = graphs(MaskRowsNet(drafter), tuple(range(2, max_k))) if parallel else None

    @staticmethod
    def run(graphs: CudaGraphRunner | None, fb: ForwardBatch) -> torch.Tensor | None:
        """o [T, H] from a captured shape, or None: run this batch eagerly. The rows are
        the runner's static buffer, valid until its next replay."""
        key = graphs.key_for(fb) if graphs is not None else None
        return None if key is None else graphs.run(fb, key)
