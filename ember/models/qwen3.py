"""Qwen3 (dense): the Llama layout plus per-head RMSNorm of q and k before RoPE."""
from __future__ import annotations

from ember.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
