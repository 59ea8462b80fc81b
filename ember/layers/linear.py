"""Linear layers whose weight format is a pluggable method.

Quantization is a method of the linear layer (create weights, load, apply); `none`
(plain dense weights) is the null method. Merged projections (q/k/v, gate/up) are one
layer with several named shards so a single GEMM serves them all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """How a linear layer stores and applies its weight."""

    def create_weights(self, layer: "Linear") -> None:
        raise NotImplementedError

    def load_shard(self, layer: "Linear", shard_offset: int, weight: torch.Tensor) -> None:
        """Copy one checkpoint tensor [shard_out, in] into rows [offset, offset + shard_out)."""
        raise NotImplementedError

    def load_tensor(self, layer: "Linear", kind: str, shard_offset: int, shard_rows: int,
                    tensor: torch.Tensor) -> str | None:
        """Load checkpoint tensor `<module>.<kind>` of one shard (rows [offset, offset + rows)).
        Returns the name of the layer parameter it filled (None: a tensor the method ignores)."""
        if kind != "weight":
            raise KeyError(f"{type(self).__name__} has no tensor {kind!r}")
        self.load_shard(layer, shard_offset, tensor)
        return "weight"

    def finalize(self, layer: "Linear") -> None:
        """Called once after loading (e.g. to quantize weights loaded in full precision)."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """The null method: a dense weight in the run dtype."""

    def create_weights(self, layer: "Linear") -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features),
                                    requires_grad=False)

    def load_shard(self, layer: "Linear", shard_offset: int, weight: torch.Tensor) -> None:
        rows = weight.shape[0]
        layer.weight.data[shard_offset:shard_offset + rows].copy_(weight)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class GemvLinearMethod(UnquantizedLinearMethod):
    """Dense weights; a single activation row (batch-1 decode) goes through ember's Triton
    GEMV, which streams the weights 1.01-1.18x faster than cuBLAS at Llama-8B shapes on an
    H200 (bench/gemv_gpu.py); anything else through F.linear. Chosen with the Triton layer
    kernels, for layers at least GEMV_MIN_DIM wide both ways (the shapes measured)."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.numel() == layer.in_features:
            from ember.layers.triton_gemv import gemv
            return gemv(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)


GEMV_MIN_DIM = 2048


def use_gemv_for_dense_layers(model: nn.Module) -> None:
    """Switch the dense linear layers of a built model that are large enough to the GEMV method."""
    for m in model.modules():
        if (isinstance(m, Linear) and type(m.method) is UnquantizedLinearMethod
                and min(m.in_features, m.out_features) >= GEMV_MIN_DIM):
            m.method = GemvLinearMethod()


class Linear(nn.Module):
    """y = x W^T (+ b), with W possibly made of shards loaded from separate checkpoint tensors.

    `shard_sizes` maps a shard name (e.g. "q", "k", "v") to its number of output rows;
    a plain layer has the single shard None.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str | None, int] | int,
                 bias: bool = False, method: LinearMethod | None = None) -> None:
        super().__init__()
        if isinstance(shard_sizes, int):
            shard_sizes = {None: shard_sizes}
        self.in_features = in_features
        self.shard_offsets: dict[str | None, int] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size
        self.out_features = offset
        self.shard_sizes = dict(shard_sizes)
        self.method = method or UnquantizedLinearMethod()
        self.method.create_weights(self)
        self.bias = nn.Parameter(torch.zeros(offset), requires_grad=False) if bias else None

    def load(self, weight: torch.Tensor, shard: str | None = None) -> None:
        self.method.load_shard(self, self.shard_offsets[shard], weight)

    def load_tensor(self, kind: str, tensor: torch.Tensor, shard: str | None = None) -> str | None:
        """Load checkpoint tensor `<this module>.<kind>` (weight, bias, or a quantized tensor);
        returns the parameter it filled (None when the method ignores that tensor)."""
        if kind == "bias":
            self.load_bias(tensor, shard)
            return "bias"
        return self.method.load_tensor(self, kind, self.shard_offsets[shard],
                                       self.shard_sizes[shard], tensor)

    def load_bias(self, bias: torch.Tensor, shard: str | None = None) -> None:
        offset = self.shard_offsets[shard]
        self.bias.data[offset:offset + bias.shape[0]].copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        return self.method.apply(self, x)
