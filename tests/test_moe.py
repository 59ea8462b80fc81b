"""The DeepSeek-V3 MoE block against transformers' DeepseekV3MoE: routing (group-limited
top-k with the correction bias), the whole block with the same weights, the grouped experts
against the per-token reference, and loading. CPU, fp32."""
from __future__ import annotations

import pytest
import torch

from ember.layers.moe import DeepseekMoE, MoEConfig
from ember.layers.moe_experts import GroupedExperts, ReferenceExperts
from ember.layers.moe_router import grouped_topk_route
from ember.models.loader import randomize

hf_ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config

H, I = 32, 16


def hf_config(cfg: MoEConfig) -> DeepseekV3Config:
    return DeepseekV3Config(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
                            n_routed_experts=cfg.n_routed_experts,
                            num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
                            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                            routed_scaling_factor=cfg.routed_scaling_factor,
                            n_shared_experts=cfg.n_shared_experts, hidden_act="silu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sort_by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


# (E, n_group, topk_group, top_k)
ROUTINGS = [(8, 1, 1, 2), (16, 4, 2, 3), (32, 8, 3, 6), (64, 8, 4, 8), (16, 2, 1, 8)]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("e,n_group,topk_group,top_k", ROUTINGS)
def test_routing_matches_hf(e, n_group, topk_group, top_k, norm):
    cfg = MoEConfig(H, I, e, top_k, n_group, topk_group, norm, routed_scaling_factor=2.5)
    router = hf_ds.DeepseekV3TopkRouter(hf_config(cfg))
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, H, generator=gen(0)) * 0.3)
        # Large enough to change which experts and groups win.
        router.e_score_correction_bias.copy_(torch.randn(e, generator=gen(1)) * 0.2)
    x = torch.randn(50, H, generator=gen(2))
    _, ref_w, ref_ids = router(x)
    w, ids = grouped_topk_route(x, router.weight, router.e_score_correction_bias, top_k, n_group,
                                topk_group, norm, 2.5)
    assert w.dtype == torch.float32 and w.shape == ids.shape == (50, top_k)
    ref_w, ref_ids = sort_by_expert(ref_w, ref_ids)
    w, ids = sort_by_expert(w, ids)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)


def test_routing_bias_selects_but_does_not_weight():
    """A huge bias on one expert forces it into every token's choice, yet its weight is still
    its unbiased score."""
    e, top_k = 8, 2
    gate = torch.randn(e, H, generator=gen(3))
    bias = torch.zeros(e)
    bias[5] = 100.0
    x = torch.randn(10, H, generator=gen(4))
    w, ids = grouped_topk_route(x, gate, bias, top_k, 1, 1, False, 1.0)
    assert (ids == 5).any(dim=1).all()
    scores = torch.sigmoid(x @ gate.T)
    torch.testing.assert_close(w, scores.gather(1, ids))


def test_routing_respects_groups():
    """Every chosen expert lies in one of topk_group groups."""
    e, n_group, topk_group = 32, 8, 2
    x = torch.randn(40, H, generator=gen(5))
    gate = torch.randn(e, H, generator=gen(6))
    _, ids = grouped_topk_route(x, gate, None, 6, n_group, topk_group, True, 1.0)
    groups_used = [(row // (e // n_group)).unique().numel() for row in ids]
    assert max(groups_used) <= topk_group
    assert max(groups_used) == topk_group  # 6 experts cannot all fit in one group of 4


def make_pair(cfg: MoEConfig, seed: int, experts: str) -> tuple[DeepseekMoE, torch.nn.Module]:
    """An HF block with random weights and ours loaded from it through its checkpoint names."""
    hf = hf_ds.DeepseekV3MoE(hf_config(cfg)).eval()
    g = gen(seed)
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name == "gate.weight" else 0.1))
        hf.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.1)
    ours = DeepseekMoE(cfg, experts=experts)
    sd = hf.state_dict()
    tensors = {"gate.weight": sd["gate.weight"],
               "gate.e_score_correction_bias": sd["gate.e_score_correction_bias"]}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        tensors[f"shared_experts.{proj}.weight"] = sd[f"shared_experts.{proj}.weight"]
    # transformers 5 keeps the experts fused; split them back into checkpoint names.
    gate_up, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]   # [E, 2I, H], [E, H, I]
    for j in range(cfg.n_routed_experts):
        tensors[f"experts.{j}.gate_proj.weight"] = gate_up[j, :cfg.moe_intermediate_size]
        tensors[f"experts.{j}.up_proj.weight"] = gate_up[j, cfg.moe_intermediate_size:]
        tensors[f"experts.{j}.down_proj.weight"] = down[j]
    loaded: set[str] = set()
    for name, t in tensors.items():
        loaded.update(ours.load_tensor(name, t))
    assert loaded == {n for n, _ in ours.named_parameters()}
    return ours, hf


BLOCKS = [MoEConfig(H, I, 16, 4, 4, 2, True, 2.5, 1), MoEConfig(H, I, 8, 2, 1, 1, False, 1.0, 2)]


@pytest.mark.parametrize("experts", ["reference", "grouped", "auto"])
@pytest.mark.parametrize("cfg", BLOCKS)
@pytest.mark.parametrize("t", [1, 7, 64])
def test_block_matches_hf(cfg, t, experts):
    ours, hf = make_pair(cfg, seed=t, experts=experts)
    x = torch.randn(t, H, generator=gen(100 + t))
    with torch.no_grad():
        ref = hf(x)
        out = ours(x)
    assert out.shape == (t, H) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def random_experts(e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(e, 2 * I, H, generator=g) * 0.2, torch.randn(e, H, I, generator=g) * 0.2


@pytest.mark.parametrize("t,k", [(1, 1), (1, 6), (5, 2), (33, 4)])
def test_grouped_equals_reference(t, k):
    """Random ids over 16 experts: small t leaves most experts without tokens."""
    e = 16
    w13, w2 = random_experts(e, seed=t)
    x = torch.randn(t, H, generator=gen(7))
    ids = torch.stack([torch.randperm(e, generator=gen(8 + i))[:k] for i in range(t)])
    weights = torch.rand(t, k, generator=gen(9))
    ref = ReferenceExperts().forward(x, w13, w2, weights, ids)
    out = GroupedExperts().forward(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 0.1  # the comparison is not of zeros


def test_grouped_all_tokens_one_expert_and_last_expert():
    e, t = 8, 6
    w13, w2 = random_experts(e, seed=1)
    x = torch.randn(t, H, generator=gen(10))
    ids = torch.tensor([[7, 0]] * t)
    weights = torch.rand(t, 2, generator=gen(11))
    torch.testing.assert_close(GroupedExperts().forward(x, w13, w2, weights, ids),
                               ReferenceExperts().forward(x, w13, w2, weights, ids))


def test_bf16_runs_and_stays_close_to_fp32():
    cfg = BLOCKS[0]
    ours, _ = make_pair(cfg, seed=3, experts="grouped")
    x = torch.randn(9, H, generator=gen(12))
    ref = ours(x)
    out = ours.to(torch.bfloat16)(x.bfloat16())
    # .to() rounds the router weights to bf16 too; routing still runs in fp32, and the
    # chosen experts can differ only at near ties, so compare loosely.
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_load_reports_experts_only_when_complete():
    cfg = MoEConfig(H, I, 4, 2)
    moe = DeepseekMoE(cfg)
    got = []
    for j in range(4):
        got += moe.load_tensor(f"experts.{j}.down_proj.weight", torch.zeros(H, I))
    assert got == ["experts.w2"]
    assert moe.load_tensor("experts.0.gate_proj.weight", torch.zeros(I, H)) == []
    assert moe.load_tensor("shared_experts.up_proj.weight", torch.zeros(I, H)) == \
        ["shared_experts.gate_up_proj.weight"]
    for bad in ("experts.4.up_proj.weight", "experts.0.w1.weight", "router.weight", "experts.w13"):
        with pytest.raises(KeyError):
            moe.load_tensor(bad, torch.zeros(I, H))
    with pytest.raises(ValueError):
        moe.load_tensor("experts.1.up_proj.weight", torch.zeros(H, I))


def test_dummy_weights_give_a_sane_router():
    """The dummy loader's fill (1-D params 0, N-D N(0, 0.02)) routes each token to k distinct
    experts with normalized weights and gives finite, non-zero outputs."""
    cfg = MoEConfig(64, I, 16, 4, 4, 2, True, 2.5, 1)
    moe = DeepseekMoE(cfg)
    with torch.no_grad():
        randomize(moe, seed=0)
        x = torch.randn(20, 64, generator=gen(13))
        w, ids = moe.route(x)
        out = moe(x)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(w.sum(1), torch.full((20,), 2.5))
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_config_validation_and_from_hf():
    with pytest.raises(ValueError):
        MoEConfig(H, I, 10, 2, n_group=4)
    with pytest.raises(ValueError):
        MoEConfig(H, I, 16, 9, n_group=4, topk_group=2)
    hf = hf_config(BLOCKS[0]).to_dict()
    assert MoEConfig.from_hf(hf) == BLOCKS[0]
