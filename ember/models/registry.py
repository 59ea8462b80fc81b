"""Maps a config's `architectures` entry to the model class that implements it, and the
model to the attention backend family it needs."""
from __future__ import annotations

import torch
from torch import nn

from ember.attention.backend import AttentionBackendBase, get_attention_backend
from ember.config import ModelConfig
from ember.models.deepseek_v3 import DeepseekV3ForCausalLM
from ember.models.llama import LlamaForCausalLM
from ember.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[architecture]


def attention_backend_for(config: ModelConfig, name: str,
                          device: torch.device | None = None) -> AttentionBackendBase:
    """The attention backend `name` (auto | torch | triton) of the family the model reads
    its KV cache with. A model class may define `make_attention_backend(name, device,
    config)` (MLA models do); the others get the standard paged backend."""
    make = getattr(get_model_class(config.architecture), "make_attention_backend", None)
    return make(name, device, config) if make is not None else get_attention_backend(name, device)
