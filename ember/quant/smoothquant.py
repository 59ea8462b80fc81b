"""SmoothQuant W8A8 linear method: INT8 weights per output channel, INT8 activations
quantized dynamically per token, one INT8 GEMM (`torch._int_mm`, CPU and CUDA).

The smoothing itself (dividing activations by s and multiplying weight columns by s,
with s folded into the preceding RMSNorm) happens in `ember quantize --method
smoothquant` (smoothquant_calibrate.py); at run time this is plain W8A8.
Tensors: weight [out, in] int8, weight_scale [out] fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.linear import Linear
from ember.quant.base import QuantLinearMethod, register

# torch._int_mm on CUDA needs more than 16 rows (and K, N multiples of 8): smaller
# batches are padded with zero rows (their outputs are dropped).
CUDA_MIN_ROWS = 17


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: x [rows, K] -> (int8 [rows, K], scale fp32 [rows, 1])."""
    scale = (x.abs().amax(-1, keepdim=True).float() / 127.0).clamp(min=1e-12)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


@register("smoothquant")
class W8A8Int8LinearMethod(QuantLinearMethod):

    def quantized_shapes(self, layer: Linear):
        return {"weight": ((layer.out_features, layer.in_features), torch.int8),
                "weight_scale": ((layer.out_features,), torch.float32)}

    def quantize(self, layer: Linear, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_int8_rows(weight)
        return {"weight": q, "weight_scale": scale.reshape(-1)}

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale[:, None]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        xq, sx = quantize_int8_rows(x2)
        if x.is_cuda and rows < CUDA_MIN_ROWS:
            xq = F.pad(xq, (0, 0, 0, CUDA_MIN_ROWS - rows))
        acc = torch._int_mm(xq, layer.weight.t())[:rows]          # [rows, out] int32
        y = (acc.float() * sx * layer.weight_scale).to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if layer.bias is None else y + layer.bias
