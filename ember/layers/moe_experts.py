"""How the routed experts of a MoE layer are computed, behind one interface.

Every implementation computes, for each token t and each of its k chosen experts e,
    out[t] += w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))
from fused per-layer weights `w13` [E, 2 * I, H] (gate rows, then up rows) and `w2`
[E, H, I]. They differ only in how the work is batched:

- `reference`: one token and one expert at a time. Slow and obviously right: the twin the
  others are tested against.
- `grouped`: the (token, expert) pairs are sorted by expert, each expert that got tokens runs
  two GEMMs over all of its tokens, and the results are scattered back with their weights.
  One host sync per call (the per-expert counts); the CPU path.
- `triton` (triton_moe.py): grouped GEMMs as two kernel launches over (expert tile, N tile)
  with no host sync, so decode steps can be captured in CUDA graphs. CUDA only.
- `auto`: triton on CUDA when triton imports, grouped elsewhere. The default.

Numerics follow transformers' DeepseekV3Experts: each expert's output is multiplied by its
fp32 weight and rounded to the activation dtype (the Triton kernel multiplies its fp32
accumulator before that rounding, one rounding fewer); the k contributions of a token are
then summed in fp32 and rounded once (transformers adds them in the activation dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps

MOE_EXPERTS = ("auto", "reference", "grouped", "triton")


class MoEExperts:
    """Interface: the routed experts' computation (weights are owned by the MoE block)."""

    name = "base"

    def forward(self, x: torch.Tensor,        # [T, H]
                w13: torch.Tensor,            # [E, 2 * I, H]
                w2: torch.Tensor,             # [E, H, I]
                weights: torch.Tensor,        # [T, k] fp32
                ids: torch.Tensor,            # [T, k] int
                ops: LayerOps = TORCH_LAYER_OPS) -> torch.Tensor:
        """Returns the weighted sum of each token's experts, [T, H] in x's dtype."""
        raise NotImplementedError


class ReferenceExperts(MoEExperts):
    """A plain loop over tokens and their experts."""

    name = "reference"

    def forward(self, x, w13, w2, weights, ids, ops=TORCH_LAYER_OPS):
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for t in range(x.shape[0]):
            for j, e in enumerate(ids[t].tolist()):
                h = ops.silu_and_mul(F.linear(x[t:t + 1], w13[e]))     # [1, I]
                y = F.linear(h, w2[e])                                 # [1, H]
                out[t] += (y * weights[t, j]).to(x.dtype)[0].float()
        return out.to(x.dtype)


class GroupedExperts(MoEExperts):
    """Pairs sorted by expert; two GEMMs per expert that has tokens; index_add_ back."""

    name = "grouped"

    def forward(self, x, w13, w2, weights, ids, ops=TORCH_LAYER_OPS):
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)                                    # [T * k]
        order = flat_ids.argsort(stable=True)                         # pair positions by expert
        tokens = order // k                                           # [T * k] token of each pair
        pair_weights = weights.reshape(-1)[order].unsqueeze(1)        # [T * k, 1] fp32
        counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
        xs = x[tokens]                                                # [T * k, H]
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = slice(start, start + n)
            h = ops.silu_and_mul(F.linear(xs[seg], w13[e]))           # [n, I]
            ys[seg] = F.linear(h, w2[e])
            start += n
        ys = (ys * pair_weights).to(x.dtype)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, tokens, ys.float())
        return out.to(x.dtype)


class AutoExperts(MoEExperts):
    """Triton on CUDA (when it imports), grouped elsewhere; decided per call by x's device,
    so a block built on the CPU and moved to the GPU still takes the GPU path."""

    name = "auto"

    def __init__(self) -> None:
        self.cpu = GroupedExperts()
        self.cuda: MoEExperts | None = None

    def forward(self, x, w13, w2, weights, ids, ops=TORCH_LAYER_OPS):
        if not x.is_cuda:
            return self.cpu.forward(x, w13, w2, weights, ids, ops)
        if self.cuda is None:
            try:
                from ember.layers.triton_moe import TritonExperts
                self.cuda = TritonExperts()
            except ImportError:
                self.cuda = self.cpu
        return self.cuda.forward(x, w13, w2, weights, ids, ops)


def get_moe_experts(name: str) -> MoEExperts:
    """One of MOE_EXPERTS."""
    if name == "auto":
        return AutoExperts()
    if name == "reference":
        return ReferenceExperts()
    if name == "grouped":
        return GroupedExperts()
    if name == "triton":
        from ember.layers.triton_moe import TritonExperts
        return TritonExperts()
    raise ValueError(f"unknown MoE experts implementation {name!r}; choose one of {', '.join(MOE_EXPERTS)}")
