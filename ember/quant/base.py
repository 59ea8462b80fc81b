"""Quantization config, the registry of methods, and detection from a checkpoint.

A quantized `Linear` keeps every quantized tensor with the output rows first
(`[out, ...]`), so merged projections (q/k/v, gate/up) load shard by shard as row
ranges and a checkpoint splits back into Hugging Face projections the same way.

Two ways to get a quantized layer:
- `prequantized`: the checkpoint holds the quantized tensors (detected from its
  config.json `quantization_config`); `create_weights` allocates them, loading copies rows.
- quantize-on-load (`--quantization M` on a full-precision checkpoint or dummy weights):
  `create_weights` allocates a full-precision staging `weight`; after loading, `finalize`
  quantizes it (round to nearest, no calibration) and frees it. Calibrated AWQ / SmoothQuant
  come from `ember quantize`, which writes a prequantized checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ember.layers.linear import Linear, LinearMethod, UnquantizedLinearMethod


def effective_group_size(in_features: int, group_size: int, multiple: int = 8) -> int:
    """The largest group size <= `group_size` that divides `in_features` and is a multiple
    of `multiple` (so packed words never straddle a group). SmolLM2's 576 gives 96 for 128."""
    for g in range(min(group_size, in_features), 0, -1):
        if in_features % g == 0 and g % multiple == 0:
            return g
    raise ValueError(f"in_features {in_features} has no group size <= {group_size} "
                     f"that is a multiple of {multiple}")


@dataclass
class QuantConfig:
    """What quantization a model uses. `params` holds method-specific options
    (e.g. nvfp4 `activations`: "none" | "nvfp4"; fp8 `weight_scheme`: "channel" | "tensor";
    `lm_head`: True when the LM head is quantized too)."""

    method: str                      # a key of QUANT_METHODS
    group_size: int = 128            # int4 only
    prequantized: bool = False       # tensors in the checkpoint are already quantized
    checkpoint_format: str = "ember"  # ember | autoawq | modelopt | compressed-tensors
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; choose one of "
                             f"{', '.join(QUANT_METHODS)}")

    def linear_method(self) -> LinearMethod:
        return QUANT_METHODS[self.method](self)

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` ember writes into a checkpoint's config.json."""
        return {"quant_method": self.method, "format": "ember", "group_size": self.group_size,
                "group_size_rule": "largest divisor of in_features <= group_size, multiple of 8",
                **self.params}


class QuantLinearMethod(LinearMethod):
    """Base of the quantized methods.

    Subclasses declare their quantized tensors in `quantized_shapes` (all rows-first) and
    implement `quantize` (full-precision weight -> those tensors) and `apply`.
    """

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg

    # ---- to implement ----------------------------------------------------------------------
    def quantized_shapes(self, layer: Linear) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of each quantized tensor; shape[0] is out_features."""
        raise NotImplementedError

    def quantize(self, layer: Linear, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """weight: [out, in] full precision -> the tensors of `quantized_shapes`."""
        raise NotImplementedError

    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The weight the layer computes with, [out, in] in fp32 (tests, reference path)."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------
    def create_weights(self, layer: Linear) -> None:
        if self.cfg.prequantized:
            self._register(layer, {n: torch.zeros(s, dtype=d)
                                   for n, (s, d) in self.quantized_shapes(layer).items()})
        else:
            layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features),
                                        requires_grad=False)

    def load_shard(self, layer: Linear, shard_offset: int, weight: torch.Tensor) -> None:
        if self.cfg.prequantized:
            raise ValueError("this checkpoint is quantized: expected quantized tensors, got a "
                             "full-precision weight")
        layer.weight.data[shard_offset:shard_offset + weight.shape[0]].copy_(weight)

    def load_tensor(self, layer: Linear, kind: str, shard_offset: int, shard_rows: int,
                    tensor: torch.Tensor) -> str | None:
        if kind == "weight" and not self.cfg.prequantized:
            self.load_shard(layer, shard_offset, tensor)
            return kind
        target = getattr(layer, kind, None)
        if not isinstance(target, torch.Tensor):
            raise KeyError(f"{type(self).__name__} has no tensor {kind!r}")
        rows = target.data[shard_offset:shard_offset + shard_rows]
        if tensor.numel() == 1 and rows.dim() == 1:
            rows.fill_(tensor.reshape(()).item())  # a per-tensor scale of this shard
        else:
            rows.copy_(tensor.reshape(rows.shape))
        return kind

    def finalize(self, layer: Linear) -> None:
        if self.cfg.prequantized or getattr(layer, "weight", None) is None:
            return
        weight = layer.weight.data
        del layer.weight
        self._register(layer, self.quantize(layer, weight))

    def cpu_weight(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        """The CPU path's weight: dequantized once and kept (the CPU has no fused kernel, and
        dequantizing every weight at every decode step made generation ~100x slower). It
        computes with exactly the format's values; it saves no memory on the CPU."""
        w = getattr(self, "_cpu_weight", None)
        if w is None or w.dtype != dtype:
            w = self._cpu_weight = self.dequantize(layer).to(dtype)
        return w

    def export(self, layer: Linear) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores for this layer (rows-first, merged shards)."""
        return {n: getattr(layer, n).data for n in self.quantized_shapes(layer)}

    @staticmethod
    def _register(layer: Linear, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            layer.register_parameter(name, nn.Parameter(t, requires_grad=False))


QUANT_METHODS: dict[str, Callable[[QuantConfig], LinearMethod]] = {}


def register(name: str):
    def deco(cls):
        QUANT_METHODS[name] = cls
        return cls
    return deco


QUANT_METHODS["none"] = lambda cfg: UnquantizedLinearMethod()


def linear_method_for(quant: "QuantConfig | None") -> LinearMethod | None:
    """The LinearMethod a model's linear layers get (None = the default, unquantized)."""
    return None if quant is None or quant.method == "none" else quant.linear_method()


def detect_quant_config(hf_config: dict[str, Any]) -> QuantConfig | None:
    """Read a checkpoint's `quantization_config` (ember's own, AutoAWQ GEMM, ModelOpt
    NVFP4/FP8, compressed-tensors NVFP4). None when the checkpoint is not quantized."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if qc.get("format") == "ember":
        params = {k: v for k, v in qc.items()
                  if k not in ("quant_method", "format", "group_size", "group_size_rule")}
        return QuantConfig(method, qc.get("group_size", 128), True, "ember", params)
    if method == "awq":
        if qc.get("bits", 4) != 4 or str(qc.get("version", "gemm")).lower() != "gemm" \
                or not qc.get("zero_point", True):
            raise ValueError(f"only 4-bit zero-point AutoAWQ GEMM checkpoints load; got {qc}")
        return QuantConfig("awq", qc.get("group_size", 128), True, "autoawq")
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo", "")).upper()
        if algo == "NVFP4":
            return QuantConfig("nvfp4", 16, True, "modelopt")
        if algo == "FP8":
            return QuantConfig("fp8", 128, True, "modelopt", {"weight_scheme": "tensor"})
        raise ValueError(f"ModelOpt quant_algo {algo!r} is not supported")
    if method == "compressed-tensors":
        fmt = str(qc.get("format", "")).lower()
        if "nvfp4" in fmt:
            return QuantConfig("nvfp4", 16, True, "compressed-tensors")
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (nvfp4 only)")
    raise ValueError(f"checkpoint quantization {method!r} is not supported")


def resolve_quant_config(requested: str | None, hf_config: dict[str, Any],
                         lm_head: bool = False) -> QuantConfig | None:
    """`--quantization` (None/'auto' = whatever the checkpoint says) against the checkpoint;
    `lm_head` (`--quantize-lm-head`): the LM head in the same format too (models/lm_head.py)."""
    quant = _resolve_method(requested, hf_config)
    if lm_head:
        if quant is None or quant.method == "none":
            raise ValueError("--quantize-lm-head needs a quantization (--quantization M, or a "
                             "quantized checkpoint)")
        if quant.prequantized and not quant.params.get("lm_head"):
            raise ValueError("this checkpoint's LM head is not quantized and a quantized "
                             "checkpoint is not re-quantized; `ember quantize --lm-head` writes one")
        quant.params["lm_head"] = True
    return quant


def _resolve_method(requested: str | None, hf_config: dict[str, Any]) -> QuantConfig | None:
    detected = detect_quant_config(hf_config)
    if requested in (None, "auto"):
        return detected
    if detected is not None:
        if requested != detected.method:
            raise ValueError(f"the checkpoint is {detected.method}-quantized; "
                             f"--quantization {requested} cannot re-quantize it")
        return detected
    return QuantConfig(requested)


def _import_methods() -> None:
    # Each method registers itself on import.
    from ember.quant import awq, fp8, nvfp4, smoothquant  # noqa: F401


_import_methods()
