"""KV-cache bytes per token, and tokens that fit a fixed budget, for one model's shapes with
MLA's latent cache against the same model with GQA or MHA K/V caches.

Every figure comes from the KVCacheSpec the layers report (the spec the runner allocates
from), not from a formula of its own: the MLA figure from the DeepSeek model itself (built
on the meta device, so no memory is used), the GQA / MHA ones from ember's standard
attention layer at the model's head count and qk head dim.

    python bench/kv_footprint.py [--config bench/configs/deepseek-v2-lite/config.json]
                                 [--budget-gib 40] [--dtype bfloat16] [--gqa-kv-heads 8]
"""
from __future__ import annotations

import argparse
import os

import torch

from ember.attention.backend import get_attention_backend
from ember.cache.kv_spec import KVCacheSpec
from ember.config import ModelConfig, resolve_dtype
from ember.layers.attention import Attention
from ember.models.registry import attention_backend_for, get_model_class

GiB = 1 << 30
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "deepseek-v2-lite", "config.json")


def model_specs(cfg: ModelConfig, dtype: torch.dtype) -> list[KVCacheSpec]:
    """The specs of the model's own attention layers."""
    with torch.device("meta"):
        model = get_model_class(cfg.architecture)(cfg, attention_backend_for(cfg, "torch"))
    return [layer.kv_cache_spec(dtype) for layer in model.attention_layers()]


def paged_specs(num_layers: int, heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype) -> list[KVCacheSpec]:
    """The specs of standard K/V attention layers at these shapes."""
    backend = get_attention_backend("torch")
    return [Attention(heads, kv_heads, head_dim, head_dim ** -0.5, backend).kv_cache_spec(dtype)
            for _ in range(num_layers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--budget-gib", type=float, default=40.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gqa-kv-heads", type=int, default=8)
    args = ap.parse_args()
    cfg = ModelConfig.from_file(args.config)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    hf = cfg.hf_config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    qk_dim = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    layouts = {
        "MLA (latent c_kv + k_pe)": model_specs(cfg, dtype),
        f"GQA ({args.gqa_kv_heads} KV heads x {qk_dim})": paged_specs(layers, heads, args.gqa_kv_heads, qk_dim, dtype),
        f"MHA ({heads} KV heads x {qk_dim})": paged_specs(layers, heads, heads, qk_dim, dtype),
    }
    budget = args.budget_gib * GiB
    print(f"{os.path.relpath(args.config)}: {layers} layers, {heads} heads, {args.dtype}, "
          f"budget {args.budget_gib:g} GiB")
    print(f"{'layout':<28} {'bytes/token/layer':>18} {'bytes/token':>12} {'tokens in budget':>17} {'MLA fits':>9}")
    mla_tokens = None
    for name, specs in layouts.items():
        per_token = sum(s.bytes_per_token for s in specs)
        tokens = int(budget // per_token)
        mla_tokens = mla_tokens or tokens
        print(f"{name:<28} {specs[0].bytes_per_token:>18,} {per_token:>12,} {tokens:>17,} "
              f"{mla_tokens / tokens:>8.2f}x")


if __name__ == "__main__":
    main()
