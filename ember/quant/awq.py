"""AWQ / INT4 W4A16: the linear method for group-wise asymmetric INT4 weights.

The same method serves round-to-nearest INT4 (quantize-on-load, or `ember quantize
--method rtn`) and AWQ (whose per-input-channel scales are folded into the preceding
norm or linear by `ember quantize --method awq`, so at run time it is plain INT4).
Checkpoints: ember's rows-first layout, or AutoAWQ's GEMM layout converted on load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.linear import Linear
from ember.quant.base import QuantConfig, QuantLinearMethod, effective_group_size, register
from ember.quant.int4 import dequantize_int4, from_autoawq, pack_int4, quantize_int4


@register("awq")
class Int4LinearMethod(QuantLinearMethod):
    """W4A16: packed INT4 weights, activations in the run dtype, dequant inside the GEMM."""

    def group_size(self, layer: Linear) -> int:
        return effective_group_size(layer.in_features, self.cfg.group_size)

    def quantized_shapes(self, layer: Linear):
        out, k = layer.out_features, layer.in_features
        groups = k // self.group_size(layer)
        return {"qweight": ((out, k // 8), torch.int32),
                "scales": ((out, groups), torch.get_default_dtype()),
                "qzeros": ((out, groups), torch.uint8)}

    def quantize(self, layer: Linear, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scales, zeros = quantize_int4(weight, self.group_size(layer))
        return {"qweight": pack_int4(q), "scales": scales.to(weight.dtype), "qzeros": zeros}

    def load_tensor(self, layer: Linear, kind: str, shard_offset: int, shard_rows: int,
                    tensor: torch.Tensor) -> str | None:
        if self.cfg.checkpoint_format == "autoawq":
            if kind == "qweight" and tensor.shape[0] != layer.in_features:
                raise ValueError(f"AutoAWQ qweight has {tensor.shape[0]} input rows, "
                                 f"expected {layer.in_features}")
            tensor = from_autoawq(kind, tensor)
        return super().load_tensor(layer, kind, shard_offset, shard_rows, tensor)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize_int4(layer.qweight, layer.scales, layer.qzeros)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._skinny(layer, x):
            from ember.quant.kernels.skinny_dot import int4_skinny
            y = int4_skinny(x, layer.qweight, layer.scales, layer.qzeros)
        elif x.is_cuda and self._dequant_gemm(x):
            from ember.quant.kernels.w4a16 import int4_dequant_triton
            y = F.linear(x, int4_dequant_triton(layer.qweight, layer.scales, layer.qzeros, x.dtype))
        elif x.is_cuda:
            from ember.quant.kernels.w4a16 import int4_linear_triton
            y = int4_linear_triton(x, layer.qweight, layer.scales, layer.qzeros,
                                   tensor_cores=self._small_batch_kernel() != "gemv")
        else:
            y = F.linear(x, self.cpu_weight(layer, x.dtype))
        return y if layer.bias is None else y + layer.bias

    def _small_batch_kernel(self) -> str:
        """params["small_batch_kernel"]: "mma" (default): up to GEMV_MAX_ROWS bf16 rows the
        MMA GEMV where it applies (kernels/int4_mma.py; one row tunes it against the decoder
        GEMV), then the skinny kernel up to its MAX_ROWS; "skinny": the skinny kernel from 2
        rows (the default before); "gemv": the CUDA-core w4a16.py kernels only."""
        return self.cfg.params.get("small_batch_kernel", "mma")

    def _skinny(self, layer: Linear, x: torch.Tensor) -> bool:
        """Whether x takes the tensor-core skinny kernel (kernels/skinny_dot.py): bf16, 2..MAX_ROWS
        rows, as _small_batch_kernel says (H200, Llama-8B shapes: bench/skinny_gpu.py; at 2-8
        rows the MMA GEMV measured 1.4-1.6x faster per layer than the skinny kernel)."""
        from ember.quant.kernels.int4_mma import mma_applies
        from ember.quant.kernels.skinny_dot import MAX_ROWS, int4_fits
        from ember.quant.kernels.w4a16 import GEMV_MAX_ROWS
        kind = self._small_batch_kernel()
        rows = x.numel() // x.shape[-1]
        group = self.group_size(layer)
        bf16 = x.dtype == torch.bfloat16
        if kind == "gemv" or (kind == "mma" and rows <= GEMV_MAX_ROWS
                              and mma_applies(layer.in_features, group, bf16)):
            return False
        return bf16 and 2 <= rows <= MAX_ROWS and int4_fits(layer.in_features, group)

    def _dequant_gemm(self, x: torch.Tensor) -> bool:
        """More than MAX_ROWS rows (prefill, large batches): dequantize the weight once and
        run the dense GEMM, whose MMA work per weight dwarfs the one extra pass over it
        (the fused W4A16 GEMM measured 0.35x bf16 per layer at 64 rows on the H200).
        params["large_batch_kernel"] = "gemm" keeps the fused kernel."""
        from ember.quant.kernels.skinny_dot import MAX_ROWS
        return (self.cfg.params.get("large_batch_kernel", "dequant") == "dequant"
                and x.numel() // x.shape[-1] > MAX_ROWS)


__all__ = ["Int4LinearMethod", "QuantConfig"]
