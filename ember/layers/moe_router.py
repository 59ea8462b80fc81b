"""DeepSeek-V3 routing: sigmoid scores, a bias that steers selection only, group-limited top-k.

DeepSeek-V3 balances its experts without an auxiliary loss: a per-expert bias
(`e_score_correction_bias`) is added to the scores when choosing experts, but the weights
that mix the chosen experts' outputs are the unbiased scores. Selection is limited to a few
groups of experts (on the real model, a group is a node) so a token's experts do not spread
over the whole cluster: each group is ranked by the sum of its two best biased scores and only
the best `topk_group` groups are eligible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_topk_route(x: torch.Tensor,              # [T, H] activations, any float dtype
                       gate_weight: torch.Tensor,    # [E, H]
                       correction_bias: torch.Tensor | None,  # [E] fp32, or None (no bias)
                       top_k: int, n_group: int, topk_group: int,
                       norm_topk_prob: bool, routed_scaling_factor: float,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose `top_k` experts per token. Returns (weights [T, top_k] fp32, ids [T, top_k] int64).

    The experts of a token come in no particular order. With `norm_topk_prob` the chosen
    scores are divided by their sum; either way they are then scaled by
    `routed_scaling_factor`.
    """
    num_tokens, num_experts = x.shape[0], gate_weight.shape[0]
    # fp32 throughout: the sigmoid saturates and near-ties decide which experts run.
    scores = F.linear(x.float(), gate_weight.float()).sigmoid()          # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1 and topk_group < n_group:
        per_group = num_experts // n_group
        group_score = choice.view(num_tokens, n_group, per_group).topk(2, dim=-1).values.sum(-1)
        kept = group_score.topk(topk_group, dim=-1, sorted=False).indices    # [T, topk_group]
        group_ok = torch.zeros(num_tokens, n_group, dtype=torch.bool, device=x.device)
        group_ok.scatter_(1, kept, True)
        expert_ok = group_ok.repeat_interleave(per_group, dim=1)              # [T, E]
        choice = choice.masked_fill(~expert_ok, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices                    # [T, k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids
