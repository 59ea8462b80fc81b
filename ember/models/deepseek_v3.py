"""DeepSeek-V3: MLA attention over a latent KV cache, dense MLPs in the first
`first_k_dense_replace` layers and DeepSeek MoE (ember/layers/moe.py) after.

Module names mirror Hugging Face's so checkpoints load by name. The projections that read
the layer input (q_a_proj or q_proj, and kv_a_proj_with_mqa) are merged into one GEMM,
`fused_qkv_a_proj`, loaded shard by shard like Llama's qkv_proj. kv_b_proj stays a plain
dense weight: the MLA backend folds it into the query and output (absorbed attention) or
up-projects the latent with it (expanded prefill), so it is never quantized.

Numerics follow transformers' DeepseekV3ForCausalLM: RoPE on the last qk_rope_head_dim of
each query head and on the shared k_pe; with `rope_interleave` (the default) the rope
dimensions come in (even, odd) pairs and are de-interleaved first, which is what
transformers does (its rotated output is in the de-interleaved order, so the cached k_pe
matches its cache). YaRN scales cos/sin by its mscale ratio and the softmax by
mscale(factor, mscale_all_dim)^2.

The MoE blocks compute their routed experts with `auto` (Triton on CUDA: no host sync, so
decode steps are captured in CUDA graphs along with the Triton MLA backend; grouped GEMMs
on the CPU).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.attention.mla_backend import MLABackend, MLADims, get_mla_backend
from ember.config import ModelConfig
from ember.engine.forward_batch import ForwardBatch
from ember.layers.latent_attention import LatentAttention
from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps, RopeStep
from ember.layers.linear import Linear
from ember.layers.moe import DeepseekMoE, MoEConfig
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding, rope_type, yarn_mscale
from ember.models.llama import LlamaMLP, PreNormDecoderLayer, load_hf_tensors
from ember.models.mtp_block import DecoderLayerBlock
from ember.models.lm_head import build_lm_head, compute_logits, head_weights
from ember.quant.base import linear_method_for

# checkpoint projection name -> (merged module name, shard name)
MERGED_PROJECTIONS = {
    "q_a_proj": ("fused_qkv_a_proj", "q_a"), "q_proj": ("fused_qkv_a_proj", "q"),
    "kv_a_proj_with_mqa": ("fused_qkv_a_proj", "kv_a"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}
# transformers' DeepSeek attention builds q_a_layernorm and kv_a_layernorm with the default
# eps, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _get(d: dict[str, Any], key: str, default: Any) -> Any:
    value = d.get(key)
    return default if value is None else value


@dataclass(frozen=True)
class DeepseekConfig:
    """DeepSeek's own config.json fields (defaults: transformers' DeepseekV3Config)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    first_k_dense_replace: int
    n_routed_experts: int | None     # None or 0: every layer dense
    moe_intermediate_size: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> DeepseekConfig:
        d = cfg.hf_config
        return cls(
            q_lora_rank=d.get("q_lora_rank", 1536),   # an explicit null means no q compression
            kv_lora_rank=_get(d, "kv_lora_rank", 512),
            qk_nope_head_dim=_get(d, "qk_nope_head_dim", 128),
            qk_rope_head_dim=_get(d, "qk_rope_head_dim", 64),
            v_head_dim=_get(d, "v_head_dim", 128),
            rope_interleave=bool(_get(d, "rope_interleave", True)),
            first_k_dense_replace=_get(d, "first_k_dense_replace", 3),
            n_routed_experts=d.get("n_routed_experts", 256),
            moe_intermediate_size=_get(d, "moe_intermediate_size", 2048),
            n_shared_experts=_get(d, "n_shared_experts", 1),
            num_experts_per_tok=_get(d, "num_experts_per_tok", 8),
            n_group=_get(d, "n_group", 8),
            topk_group=_get(d, "topk_group", 4),
            norm_topk_prob=bool(_get(d, "norm_topk_prob", True)),
            routed_scaling_factor=float(_get(d, "routed_scaling_factor", 2.5)),
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def mla_dims(self, num_heads: int) -> MLADims:
        return MLADims(num_heads, self.kv_lora_rank, self.qk_nope_head_dim,
                       self.qk_rope_head_dim, self.v_head_dim)

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.n_routed_experts) and layer >= self.first_k_dense_replace

    def moe_config(self, hidden_size: int) -> MoEConfig:
        return MoEConfig(hidden_size=hidden_size, moe_intermediate_size=self.moe_intermediate_size,
                         n_routed_experts=self.n_routed_experts,
                         num_experts_per_tok=self.num_experts_per_tok, n_group=self.n_group,
                         topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                         routed_scaling_factor=self.routed_scaling_factor,
                         n_shared_experts=self.n_shared_experts)


def softmax_scale(cfg: ModelConfig, ds: DeepseekConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 when it is set:
    the temperature the stretched rope needs, applied to the whole score (nope part too)."""
    scale = ds.qk_head_dim ** -0.5
    scaling = cfg.rope_scaling
    if rope_type(scaling) != "default" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale *= m * m
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., P] in (x0, x1), (x2, x3), ... pairs -> [..., P] as (x0, x2, ...), (x1, x3, ...)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def is_mtp_weight(name: str, num_hidden_layers: int) -> bool:
    """True for the checkpoint tensors of the multi-token-prediction layers DeepSeek-V3
    checkpoints append after the main stack (`model.layers.{num_hidden_layers}.*`, ...).
    The main model skips them; an MTP proposer loads them."""
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= num_hidden_layers


def mtp_weight_names(names: Iterable[str], num_hidden_layers: int) -> list[str]:
    """The MTP layers' tensor names among a checkpoint's (see is_mtp_weight)."""
    return [n for n in names if is_mtp_weight(n, num_hidden_layers)]


class DeepseekV3Attention(nn.Module):
    """MLA: the query (optionally through a low-rank q_a/q_b pair) and a compressed latent
    plus one shared rope key from the input; attention itself is the MLA backend's."""

    def __init__(self, cfg: ModelConfig, ds: DeepseekConfig, backend: MLABackend,
                 ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.ds = ds
        h = self.num_heads = cfg.num_attention_heads
        method = linear_method_for(cfg.quantization)
        q_out = ds.q_lora_rank if ds.q_lora_rank else h * ds.qk_head_dim
        self.q_shard = "q_a" if ds.q_lora_rank else "q"
        self.fused_qkv_a_proj = Linear(
            cfg.hidden_size, {self.q_shard: q_out, "kv_a": ds.kv_lora_rank + ds.qk_rope_head_dim},
            bias=cfg.attention_bias, method=method)
        self.split_sizes = [q_out, ds.kv_lora_rank, ds.qk_rope_head_dim]
        if ds.q_lora_rank:
            self.q_a_layernorm = RMSNorm(ds.q_lora_rank, LATENT_NORM_EPS, ops)
            self.q_b_proj = Linear(ds.q_lora_rank, h * ds.qk_head_dim, method=method)
        self.kv_a_layernorm = RMSNorm(ds.kv_lora_rank, LATENT_NORM_EPS, ops)
        self.kv_b_proj = Linear(ds.kv_lora_rank, h * (ds.qk_nope_head_dim + ds.v_head_dim))
        self.o_proj = Linear(h * ds.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias,
                             method=method)
        self.attn = LatentAttention(ds.mla_dims(h), softmax_scale(cfg, ds), backend)

    def forward(self, rope: RopeStep, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; rope: this step's rotary inputs."""
        ds, t = self.ds, x.shape[0]
        q, c_kv, k_pe = self.fused_qkv_a_proj(x).split(self.split_sizes, dim=-1)
        if ds.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(t, self.num_heads, ds.qk_head_dim).split(
            [ds.qk_nope_head_dim, ds.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = k_pe.view(t, 1, ds.qk_rope_head_dim)
        if ds.rope_interleave:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        q_pe, k_pe = self.ops.rope(rope, q_pe, k_pe)
        o = self.attn(q_nope, q_pe, c_kv, k_pe.view(t, ds.qk_rope_head_dim), self.kv_b_proj.weight, fb)
        return self.o_proj(o.reshape(t, self.num_heads * ds.v_head_dim))


class DeepseekV3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: ModelConfig, ds: DeepseekConfig, layer: int, backend: MLABackend,
                 ops: LayerOps) -> None:
        super().__init__(cfg, ops)
        self.self_attn = DeepseekV3Attention(cfg, ds, backend, ops)
        self.mlp: nn.Module
        if ds.is_moe_layer(layer):
            self.mlp = DeepseekMoE(ds.moe_config(cfg.hidden_size), ops, cfg.quantization, "auto")
        else:
            self.mlp = LlamaMLP(cfg, ops)


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, ds: DeepseekConfig, backend: MLABackend,
                 ops: LayerOps) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Rope covers only the qk_rope_head_dim part of each head (and the shared k_pe).
        self.rotary = RotaryEmbedding(ds.qk_rope_head_dim, cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling, ops)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(cfg, ds, i, backend, ops)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.lookup(positions)
        for layer in self.layers:
            h, residual = layer(rope, h, residual, fb)
        h, _ = self.norm(h, residual)
        return h


class DeepseekV3ForCausalLM(nn.Module):
    """Decoder-only causal LM with MLA; `forward` returns hidden states, `compute_logits`
    the vocab scores. Its KV cache is the latent layout (LatentAttention.kv_cache_spec)."""

    def __init__(self, cfg: ModelConfig, backend: MLABackend,
                 ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        self.config = cfg
        self.ds = DeepseekConfig.from_model_config(cfg)
        self.model = DeepseekV3Model(cfg, self.ds, backend, ops)
        self.lm_head = build_lm_head(cfg)

    @classmethod
    def make_attention_backend(cls, name: str, device: torch.device | None,
                               cfg: ModelConfig) -> MLABackend:
        """The model reads its cache through an MLA backend (auto | torch | triton)."""
        ds = DeepseekConfig.from_model_config(cfg)
        return get_mla_backend(name, device, ds.mla_dims(cfg.num_attention_heads))

    def attention_layers(self) -> list[LatentAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        return compute_logits(self.lm_head, self.model.embed_tokens, hidden)

    def mtp_block(self, backend: MLABackend, ops: LayerOps) -> DecoderLayerBlock:
        """The decoder layer of a DeepSeek-V3 MTP module (ember.spec.mtp): MLA + MoE, built as
        layer num_hidden_layers (dense or MoE by first_k_dense_replace, as the checkpoint's)."""
        layer = DeepseekV3DecoderLayer(self.config, self.ds, self.config.num_hidden_layers, backend, ops)
        return DecoderLayerBlock(layer, self.model.rotary, load_deepseek_tensors)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors (experts one by one, as checkpoints store them);
        raises if any parameter is left unloaded. The MTP layers' tensors (is_mtp_weight)
        are skipped."""
        n_layers = self.config.num_hidden_layers

        def keep(name: str) -> bool:
            return not is_mtp_weight(name, n_layers)
        load_deepseek_tensors(self, ((name, t) for name, t in head_weights(
            self.config, self.lm_head, self.model.embed_tokens, weights) if keep(name)))


def load_deepseek_tensors(root: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load Hugging Face-named tensors, named relative to `root` (the model, or one decoder
    layer): MoE experts through their block, everything else as load_hf_tensors does. Raises
    if a tensor fits no module or a parameter is left unloaded."""
    moe_blocks = {f"{n}.": m for n, m in root.named_modules() if isinstance(m, DeepseekMoE)}

    def experts(name: str, tensor: torch.Tensor) -> list[str] | None:
        i = ("." + name).find(".mlp.")   # the MoE block's prefix, "mlp." at a layer's root
        block = name[:i + 4] if i >= 0 else None
        if block not in moe_blocks:
            return None
        # The block maps expert names onto its fused weights.
        return [block + p for p in moe_blocks[block].load_tensor(name[len(block):], tensor)]
    load_hf_tensors(root, weights, experts, MERGED_PROJECTIONS)
