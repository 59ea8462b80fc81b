"""RMSNorm, with the residual add fused in (one kernel on the GPU through the layer ops)."""
from __future__ import annotations

import torch
from torch import nn

from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden]. With `residual`, returns (norm(x + residual), x + residual);
        the fused path reuses x's and residual's buffers for them."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
