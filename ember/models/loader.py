"""Resolve `--model` (HF folder, GGUF file, config.json for dummy weights, or a short name)
into a config, a tensor stream and a tokenizer, then build and fill the model."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ember.attention.backend import AttentionBackend
from ember.config import ModelConfig
from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps
from ember.layers.linear import Linear
from ember.models.registry import get_model_class

logger = logging.getLogger("ember")

WeightStream = Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]
SHORT_NAMES = ("smollm2-135m", "smollm2-135m-instruct")


@dataclass
class ModelSource:
    """What a model path resolves to, before anything is loaded onto a device."""

    config: ModelConfig
    weights: WeightStream | None   # None for dummy weights
    tokenizer: "object | None"     # ember.tokenizer.Tokenizer, or None (token ids only)


def safetensors_stream(folder: str, keep: Callable[[str], bool] | None = None) -> WeightStream:
    """The tensors of a folder's *.safetensors files; with `keep`, only the names it accepts
    are read (e.g. one layer out of a large checkpoint)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} (ember never loads pickled .bin weights)")

    def stream(dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped
                for name in f.keys():
                    if keep is not None and not keep(name):
                        continue
                    # Not cast here: copying into each parameter casts to its dtype, and
                    # quantized tensors (int packs, fp8, fp32 scales) must keep theirs.
                    yield name, f.get_tensor(name)
    return stream


def resolve_model(model: str, load_format: str = "auto", tokenizer: str | None = None,
                  quantization: str | None = None, quantize_lm_head: bool = False) -> ModelSource:
    """Turn a user's --model into a ModelSource. Raises with a clear message when it can't.

    `quantization` (None = as the checkpoint says) and `quantize_lm_head` become
    `config.quantization`."""
    source = _resolve_model(model, load_format, tokenizer)
    from ember.quant import resolve_quant_config
    source.config.quantization = resolve_quant_config(quantization, source.config.hf_config,
                                                      quantize_lm_head)
    return source


def _resolve_model(model: str, load_format: str, tokenizer: str | None) -> ModelSource:
    if model.lower() in SHORT_NAMES:
        from ember.models.smollm2 import find_smollm2_gguf
        model = find_smollm2_gguf()
    if os.path.isfile(model) and (model.endswith(".gguf") or load_format == "gguf"):
        if load_format == "dummy":
            raise ValueError("--load-format dummy takes a config.json (or a folder holding one), not a GGUF file")
        from ember.models.gguf_loader import load_gguf
        ckpt = load_gguf(model)
        return ModelSource(ModelConfig.from_dict(ckpt.config), ckpt.tensors, ckpt.tokenizer)
    if os.path.isdir(model):
        config_path = os.path.join(model, "config.json")
    elif os.path.isfile(model) and model.endswith(".json"):
        config_path, model = model, os.path.dirname(model) or "."
        if load_format not in ("auto", "dummy"):
            raise ValueError("a config.json alone can only be run with --load-format dummy")
        load_format = "dummy"
    else:
        raise FileNotFoundError(
            f"model {model!r} not found: pass a Hugging Face model folder, a .gguf file, "
            f"a config.json with --load-format dummy, or one of {', '.join(SHORT_NAMES)}")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model} has no config.json")
    with open(config_path) as f:
        config = ModelConfig.from_dict(json.load(f))
    tok = _folder_tokenizer(tokenizer or model)
    weights = None if load_format == "dummy" else safetensors_stream(model)
    return ModelSource(config, weights, tok)


def _folder_tokenizer(folder: str):
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        logger.warning("no tokenizer.json in %s: only token-id prompts will work", folder)
        return None
    from ember.tokenizer import Tokenizer
    return Tokenizer.from_folder(folder)


def build_model(source: ModelSource, backend: AttentionBackend, device: torch.device,
                dtype: torch.dtype, seed: int = 0, ops: LayerOps = TORCH_LAYER_OPS) -> nn.Module:
    """Instantiate the registered class on `device` in `dtype`, then load (or randomize) weights.
    `ops` are the elementwise layer kernels (torch, or fused Triton on the GPU)."""
    cls = get_model_class(source.config.architecture)
    with build_context(dtype, device):
        model = cls(source.config, backend, ops)
    with torch.no_grad():
        if source.weights is None:
            randomize(model, seed)
        else:
            model.load_weights(source.weights(dtype))
        finalize_linears(model)
    if ops.name == "triton":
        from ember.layers.linear import use_gemv_for_dense_layers
        use_gemv_for_dense_layers(model)
    return model.eval()


@contextlib.contextmanager
def build_context(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Modules constructed inside get their parameters in `dtype` on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def finalize_linears(model: nn.Module) -> None:
    """After loading: quantize-on-load methods quantize their full-precision weights now."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.finalize(module)


def randomize(model: nn.Module, seed: int) -> None:
    """Dummy weights for benchmarks: small normal values, norms at one (keeps activations sane)."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in name else 0.0)
        else:
            # Drawn where the weight lives: 8B values on the CPU would take minutes.
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.copy_((torch.randn(p.shape, generator=gen, device=p.device) * 0.02).to(p.dtype))
