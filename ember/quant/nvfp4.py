"""NVFP4 linear method: weight-only (W4A16, dequantized inside the GEMM) on Hopper and the
CPU, plus an emulated W4A4 mode (activations quantized to NVFP4 per token, then
dequantized) for accuracy studies: `params["activations"] = "nvfp4"`.

ember's tensors (rows-first): weight_packed [out, in // 2] uint8, weight_scale
[out, in // 16] float8_e4m3fn, weight_scale_2 [out] fp32 (the per-tensor scale, kept per
row so merged q/k/v shards from a checkpoint may each keep their own).
Checkpoints: ModelOpt (`weight`, `weight_scale`, `weight_scale_2`, `input_scale`) and
compressed-tensors (`weight_packed`, `weight_scale`, `weight_global_scale` = 1 / ours,
`input_global_scale`). Input scales are not used: the emulated W4A4 mode scales
activations dynamically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.linear import Linear
from ember.quant.base import QuantLinearMethod, register
from ember.quant.nvfp4_format import BLOCK, dequantize_nvfp4, fake_quantize_nvfp4_rows, quantize_nvfp4

_IGNORED_INPUTS = ("input_scale", "input_global_scale")


@register("nvfp4")
class NVFP4LinearMethod(QuantLinearMethod):

    def quantized_shapes(self, layer: Linear):
        out, k = layer.out_features, layer.in_features
        if k % BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {BLOCK}, got {k}")
        return {"weight_packed": ((out, k // 2), torch.uint8),
                "weight_scale": ((out, k // BLOCK), torch.float8_e4m3fn),
                "weight_scale_2": ((out,), torch.float32)}

    def quantize(self, layer: Linear, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, block_scale, gs = quantize_nvfp4(weight)  # one global scale for the tensor
        return {"weight_packed": packed, "weight_scale": block_scale,
                "weight_scale_2": gs.expand(weight.shape[0]).contiguous()}

    def load_tensor(self, layer: Linear, kind: str, shard_offset: int, shard_rows: int,
                    tensor: torch.Tensor) -> str | None:
        if kind in _IGNORED_INPUTS:
            return None
        fmt = self.cfg.checkpoint_format
        if fmt == "modelopt" and kind == "weight":
            kind = "weight_packed"
        elif fmt == "compressed-tensors" and kind == "weight_global_scale":
            kind, tensor = "weight_scale_2", 1.0 / tensor.float()
        return super().load_tensor(layer, kind, shard_offset, shard_rows, tensor)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize_nvfp4(layer.weight_packed, layer.weight_scale, layer.weight_scale_2)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.params.get("activations", "none") == "nvfp4":
            x = fake_quantize_nvfp4_rows(x)
        args = (layer.weight_packed, layer.weight_scale, layer.weight_scale_2)
        kernel = self._kernel(layer, x) if x.is_cuda else None
        if kernel == "skinny":
            from ember.quant.kernels.skinny_dot import nvfp4_skinny
            y = nvfp4_skinny(x, *args)
        elif kernel == "dequant":
            from ember.quant.kernels.w4a16 import nvfp4_dequant_triton
            y = F.linear(x, nvfp4_dequant_triton(*args, x.dtype))
        elif kernel == "w4a16":
            from ember.quant.kernels.w4a16 import nvfp4_linear_triton
            y = nvfp4_linear_triton(x, *args, tensor_cores=self._small_batch_kernel() == "mma")
        else:
            y = F.linear(x, self.cpu_weight(layer, x.dtype))
        return y if layer.bias is None else y + layer.bias

    def _small_batch_kernel(self) -> str:
        """params["small_batch_kernel"]: "mma" (default): 1-8 bf16 rows may run on the
        tensor-core GEMV (kernels/int4_mma.py; at one row the tuner times it against the
        decoder GEMV), 9-64 on the skinny kernel (kernels/skinny_dot.py); "gemv": the
        CUDA-core kernels only (A/B runs)."""
        kind = self.cfg.params.get("small_batch_kernel", "mma")
        if kind not in ("mma", "gemv"):
            raise ValueError(f"NVFP4 small_batch_kernel must be 'mma' or 'gemv', got {kind!r}")
        return kind

    def _kernel(self, layer: Linear, x: torch.Tensor) -> str:
        """Which GPU kernel serves x: "skinny" (9-64 bf16 rows, kernels/skinny_dot.py),
        "dequant" (above 64 rows: dequantize once, then the dense GEMM; params
        large_batch_kernel "gemm" keeps the fused kernel instead) or "w4a16" (the GEMVs up
        to 8 rows, tuned, the MMA GEMV among them unless small_batch_kernel is "gemv"; the
        fused W4A16 GEMM for other rows)."""
        from ember.quant.kernels.skinny_dot import MAX_ROWS, nvfp4_fits
        from ember.quant.kernels.w4a16 import GEMV_MAX_ROWS
        rows = x.numel() // x.shape[-1]
        large = self.cfg.params.get("large_batch_kernel", "dequant")
        if large not in ("dequant", "gemm"):
            raise ValueError(f"NVFP4 large_batch_kernel must be 'dequant' or 'gemm', got {large!r}")
        if rows > MAX_ROWS:
            return "dequant" if large == "dequant" else "w4a16"
        if (rows > GEMV_MAX_ROWS and self._small_batch_kernel() == "mma" and x.dtype == torch.bfloat16
                and nvfp4_fits(layer.in_features)):
            return "skinny"
        return "w4a16"
