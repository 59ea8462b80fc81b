"""Configuration objects: what the model is, and how the engine should run it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` means bf16 on CUDA and fp32 on the CPU (CPU bf16 matmuls are slow on most parts)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_async_scheduling(mode: str, device: torch.device) -> bool:
    """Whether the engine overlaps steps: `on`, or `auto` on CUDA (on the CPU the forward
    runs on the host thread, so nothing overlaps). With speculative decoding only steps
    without drafts run ahead: a drafting step first applies the step in flight
    (Engine.step)."""
    if mode == "off":
        return False
    return mode == "on" or device.type == "cuda"


@dataclass
class ModelConfig:
    """The model's shape, read from a Hugging Face config.json (or built from GGUF metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)
    quantization: Any = None  # ember.quant.QuantConfig, set by the loader; None = unquantized

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config has no 'architectures' entry; cannot choose a model class")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # transformers 5 may nest rope settings under rope_parameters.
        rope_params = cfg.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        return cls(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hf_config=cfg,
        )

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


@dataclass
class EngineConfig:
    """How to run: memory budgets, batch limits, devices. Names follow vLLM's flags."""

    model: str
    dtype: str = "auto"
    device: str | None = None
    load_format: str = "auto"            # auto | safetensors | gguf | dummy
    tokenizer: str | None = None          # defaults to the model's own
    max_model_len: int | None = None      # defaults to the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # token budget per step (chunked prefill)
    block_size: int = 16
    gpu_memory_utilization: float = 0.9   # CUDA: fraction of the card ember may use
    kv_cache_memory: float | None = None  # CPU: GiB for the KV pool (default 1 GiB)
    num_kv_blocks: int | None = None      # exact pool size (tests, benchmarks); overrides budgets
    attention_backend: str = "auto"       # auto (triton on CUDA, torch elsewhere) | torch | triton
    layer_kernels: str = "auto"           # auto (triton on CUDA, torch elsewhere) | torch | triton: norm, RoPE, SiLU-mul
    prefix_cache: str = "radix"           # radix | none
    scheduling_policy: str = "lpm"        # lpm (longest cached prefix first) | fcfs
    seed: int = 0
    enforce_eager: bool = False           # True: no CUDA graphs for decode
    # auto (on CUDA) | on | off: overlap a step's host work with the next step's forward
    # (Engine.step; with speculation, steps without drafts)
    async_scheduling: str = "auto"
    # Speculative decoding: a dict or JSON string like vLLM's --speculative-config,
    # e.g. {"method": "ngram", "num_speculative_tokens": 3}; parsed to a SpeculativeConfig.
    speculative_config: Any = None
    quantization: str | None = None       # None: as the checkpoint says | none | awq | smoothquant | nvfp4 | fp8
    quantize_lm_head: bool = False        # the LM head in the quantization's format too (ember.models.lm_head)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.prefix_cache not in ("radix", "none"):
            raise ValueError(f"unknown prefix_cache {self.prefix_cache!r}; choose radix or none")
        if self.scheduling_policy not in ("lpm", "fcfs"):
            raise ValueError(f"unknown scheduling_policy {self.scheduling_policy!r}; choose lpm or fcfs")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"unknown async_scheduling {self.async_scheduling!r}; choose auto, on or off")
        from ember.spec.config import SpeculativeConfig
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

