"""Quantize a loaded model in place, and save it as a safetensors folder that
`--model DIR` loads (config.json with a `quantization_config`, tokenizer files)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ember.layers.linear import Linear, UnquantizedLinearMethod
from ember.models.llama import MERGED_PROJECTIONS
from ember.quant.base import QuantConfig, QuantLinearMethod
from ember.quant.calibrate import quantizable_linears

# (merged module, shard) -> the Hugging Face projection name
_SPLIT = {v: k for k, v in MERGED_PROJECTIONS.items()}


@torch.no_grad()
def quantize_model(model: nn.Module, quant: QuantConfig) -> None:
    """Replace every quantizable full-precision linear's weight with `quant`'s tensors; with
    quant.params["lm_head"] the LM head's too (round to nearest; a tied head becomes a
    quantized copy of the embedding, models/lm_head.py)."""
    layers = list(quantizable_linears(model).values())
    if quant.params.get("lm_head"):
        layers.append(untied_head(model))
    for layer in layers:
        if not isinstance(layer.method, UnquantizedLinearMethod):
            raise ValueError("the model is already quantized")
        method = quant.linear_method()
        assert isinstance(method, QuantLinearMethod)
        weight = layer.weight.data
        del layer.weight
        QuantLinearMethod._register(layer, method.quantize(layer, weight))
        layer.method = method


def untied_head(model: nn.Module) -> Linear:
    """The model's LM head as a Linear of its own (a copy of the embedding when tied)."""
    if model.lm_head is None:
        emb = model.model.embed_tokens.weight
        with torch.device(emb.device):
            head = Linear(emb.shape[1], emb.shape[0])
        head.weight = nn.Parameter(emb.data.clone(), requires_grad=False)
        model.lm_head = head
    return model.lm_head


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors: merged projections split back into q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    for name, layer in linears.items():
        method = layer.method
        tensors = method.export(layer) if isinstance(method, QuantLinearMethod) else {"weight": layer.weight.data}
        if layer.bias is not None:
            tensors["bias"] = layer.bias.data
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        for shard, offset in layer.shard_offsets.items():
            rows = layer.shard_sizes[shard]
            proj = leaf if shard is None else _SPLIT[(leaf, shard)]
            for kind, t in tensors.items():
                out[f"{prefix}{proj}.{kind}"] = t[offset:offset + rows].contiguous().cpu()
    linear_params = {f"{n}.{p}" for n, m in linears.items() for p, _ in m.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        if name not in linear_params:
            out[name] = p.data.contiguous().cpu()
    return out


def save_quantized(llm, quant: QuantConfig, out_dir: str) -> None:
    """Write model.safetensors, config.json (+ quantization_config) and the tokenizer."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    model = llm.engine.runner.model
    save_file(checkpoint_tensors(model), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    cfg = dict(llm.engine.model_config.hf_config)
    cfg["quantization_config"] = quant.to_dict()
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if llm.engine.tokenizer is not None:
        save_tokenizer(llm.engine.tokenizer, out_dir)


def save_tokenizer(tok, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens) + chat_template.jinja."""
    tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tok.special_tokens), f, indent=2)
    template = tok.chat_templates.get("default")
    if template:
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
