"""The DeepSeek-V3 mixture-of-experts block (transformers' DeepseekV3MoE).

    out = sum_j w[t, j] * expert_{id[t, j]}(x[t]) + shared_experts(x[t])

Routing is `grouped_topk_route` (moe_router.py); the routed experts are computed by a
`MoEExperts` implementation (moe_experts.py: reference | grouped | triton | auto).

Constructing::

    moe = DeepseekMoE(MoEConfig(hidden_size=7168, moe_intermediate_size=2048,
                                n_routed_experts=256, num_experts_per_tok=8,
                                n_group=8, topk_group=4, norm_topk_prob=True,
                                routed_scaling_factor=2.5, n_shared_experts=1),
                      ops=ops, quant=cfg.quantization, experts="auto")
    y = moe(x)                      # x: [T, H] -> [T, H]

`MoEConfig.from_hf(hf_config_dict)` reads the same fields from a config.json (the field
names are Hugging Face's). Build it under `torch.device(...)` and the default dtype of the
model: the expert weights take the default dtype, the router stays fp32.

Parameters (names relative to the block):

    gate.weight                         [E, H] fp32
    gate.e_score_correction_bias        [E] fp32
    experts.w13                         [E, 2 * I, H] model dtype (gate rows, then up rows)
    experts.w2                          [E, H, I] model dtype
    shared_experts.gate_up_proj.*       a merged `Linear` (shards gate, up), I_s = I * n_shared
    shared_experts.down_proj.*          a `Linear`

Loading: `moe.load_tensor(name, tensor) -> list[str]` takes one checkpoint tensor with its
Hugging Face name relative to the block (for `model.layers.5.mlp.experts.3.up_proj.weight`
pass `experts.3.up_proj.weight`): `gate.weight`, `gate.e_score_correction_bias`,
`experts.{j}.{gate,up,down}_proj.weight`, `shared_experts.{gate,up,down}_proj.<kind>` (any
tensor kind the shared experts' linear method takes, e.g. a quantized one). It returns the
block's parameter names that are now fully loaded: `experts.w13` / `experts.w2` only once
every expert's slice of them has been loaded, so a model that collects the returned names
and compares them with `named_parameters()` catches a missing expert. It raises KeyError
for a name it does not know.

Quantization: the shared experts are `Linear` layers, so quantization methods apply to
them; the routed experts are kept in the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps
from ember.layers.linear import Linear
from ember.layers.moe_experts import MoEExperts, get_moe_experts
from ember.layers.moe_router import grouped_topk_route
from ember.quant.base import linear_method_for


@dataclass(frozen=True)
class MoEConfig:
    """The shape and routing of one DeepSeek-V3 MoE block (Hugging Face field names)."""

    hidden_size: int
    moe_intermediate_size: int          # I: each routed expert's intermediate size
    n_routed_experts: int               # E
    num_experts_per_tok: int            # k
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 1           # 0: no shared experts

    def __post_init__(self) -> None:
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"{self.n_routed_experts} experts do not split into {self.n_group} groups")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError("group-limited routing ranks groups by their top-2 scores: "
                             "each group needs at least 2 experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} not in [1, n_group={self.n_group}]")
        eligible = self.topk_group * (self.n_routed_experts // self.n_group)
        if not 1 <= self.num_experts_per_tok <= eligible:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in [1, {eligible}] "
                             f"(experts in the kept groups)")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MoEConfig:
        """From a Hugging Face DeepSeek-V3 config.json dict."""
        return cls(hidden_size=hf["hidden_size"], moe_intermediate_size=hf["moe_intermediate_size"],
                   n_routed_experts=hf["n_routed_experts"],
                   num_experts_per_tok=hf["num_experts_per_tok"],
                   n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                   norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                   n_shared_experts=hf.get("n_shared_experts") or 0)


class MoEGate(nn.Module):
    """The router's parameters, fp32 whatever the model dtype (as transformers keeps them)."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        # Zero is "no correction": what a dummy load gives (1-D params are zero-filled).
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class FusedExpertWeights(nn.Module):
    """All routed experts of a layer as two stacked tensors, loaded one expert slice at a time."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size),
                               requires_grad=False)
        # Which (expert, projection) slices have been loaded, to report a parameter
        # as loaded only when all of it is.
        self._loaded: dict[str, set[tuple[int, str]]] = {"w13": set(), "w2": set()}

    def load(self, expert: int, proj: str, weight: torch.Tensor) -> list[str]:
        """weight: gate/up [I, H] or down [H, I] of one expert -> the params now complete."""
        if not 0 <= expert < self.num_experts:
            raise KeyError(f"expert {expert} out of range (0..{self.num_experts - 1})")
        i = self.intermediate_size
        if proj == "gate_proj":
            param, dst = "w13", self.w13.data[expert, :i]
        elif proj == "up_proj":
            param, dst = "w13", self.w13.data[expert, i:]
        elif proj == "down_proj":
            param, dst = "w2", self.w2.data[expert]
        else:
            raise KeyError(f"unknown expert projection {proj!r}")
        if weight.shape != dst.shape:
            raise ValueError(f"experts.{expert}.{proj}: shape {tuple(weight.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(weight)
        self._loaded[param].add((expert, proj))
        slices_per_expert = 2 if param == "w13" else 1
        return [param] if len(self._loaded[param]) == slices_per_expert * self.num_experts else []


class SharedExperts(nn.Module):
    """A dense SiLU MLP run on every token, gate and up merged into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: LayerOps,
                 quant: Any = None) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(hidden_size, {"gate": intermediate_size, "up": intermediate_size},
                                   method=linear_method_for(quant))
        self.down_proj = Linear(intermediate_size, hidden_size, method=linear_method_for(quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DeepseekMoE(nn.Module):
    """Routed experts (group-limited top-k of sigmoid scores) plus always-on shared experts.

    `quant` is a QuantConfig (or None) for the shared experts' linear layers; `experts`
    names the routed experts' implementation (see moe_experts.MOE_EXPERTS) or is one.
    """

    def __init__(self, cfg: MoEConfig, ops: LayerOps = TORCH_LAYER_OPS, quant: Any = None,
                 experts: str | MoEExperts = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.impl = get_moe_experts(experts) if isinstance(experts, str) else experts
        self.gate = MoEGate(cfg.n_routed_experts, cfg.hidden_size)
        self.experts = FusedExpertWeights(cfg.n_routed_experts, cfg.hidden_size,
                                          cfg.moe_intermediate_size)
        self.shared_experts = (
            SharedExperts(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ops, quant)
            if cfg.n_shared_experts > 0 else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] fp32, expert ids [T, k])."""
        c = self.cfg
        return grouped_topk_route(x, self.gate.weight, self.gate.e_score_correction_bias,
                                  c.num_experts_per_tok, c.n_group, c.topk_group,
                                  c.norm_topk_prob, c.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        weights, ids = self.route(x)
        out = self.impl.forward(x, self.experts.w13, self.experts.w2, weights, ids, self.ops)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def load_tensor(self, name: str, tensor: torch.Tensor) -> list[str]:
        """Load one checkpoint tensor named relative to this block; returns the parameter
        names (relative to the block) it completed. See the module docstring."""
        parts = name.split(".")
        if name in ("gate.weight", "gate.e_score_correction_bias"):
            getattr(self.gate, parts[1]).data.copy_(tensor)
            return [name]
        if parts[0] == "experts" and len(parts) == 4 and parts[1].isdigit() and parts[3] == "weight":
            return [f"experts.{p}" for p in self.experts.load(int(parts[1]), parts[2], tensor)]
        if parts[0] == "shared_experts" and len(parts) == 3 and self.shared_experts is not None:
            proj, kind = parts[1], parts[2]
            if proj in ("gate_proj", "up_proj"):
                module, shard, merged = self.shared_experts.gate_up_proj, proj[:-5], "gate_up_proj"
            elif proj == "down_proj":
                module, shard, merged = self.shared_experts.down_proj, None, "down_proj"
            else:
                raise KeyError(f"unknown MoE tensor {name!r}")
            filled = module.load_tensor(kind, tensor, shard)
            return [] if filled is None else [f"shared_experts.{merged}.{filled}"]
        raise KeyError(f"unknown MoE tensor {name!r}")
