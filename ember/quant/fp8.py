"""FP8 W8A8 (E4M3): weights per output channel (default) or per tensor, activations
quantized dynamically per token (default; one Triton launch on CUDA, kernels/fp8_quant.py)
or per tensor, one `torch._scaled_mm` on CUDA; decode-sized inputs run weight-only through
the Triton FP8 GEMV or skinny kernel instead (_small_batch_kernel). On the CPU: the
weight-only dequant fallback (activations stay in the run dtype), or with
`params["emulate_activations"]` the activations are quantized and dequantized too, so the
CPU measures what the GPU path computes.

Tensors: weight [out, in] float8_e4m3fn, weight_scale [out] fp32 (dequant multipliers; a
per-tensor scale is stored on every row). Loads ModelOpt / HF fp8 checkpoints (`weight`,
`weight_scale` per tensor or per channel; `input_scale` ignored: activations are dynamic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.layers.linear import Linear
from ember.quant.base import QuantLinearMethod, register

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, K] -> (fp8 [rows, K], scale fp32 [rows, 1] (per_row) or [1, 1])."""
    amax = x.abs().amax(-1, keepdim=True) if per_row else x.abs().amax().reshape(1, 1)
    # Times the reciprocal: what torch's CUDA division by a scalar computes (its CPU one
    # divides), so the CPU and the GPU and kernels/fp8_quant.py agree bit for bit.
    scale = (amax.float() * (1.0 / FP8_MAX)).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@register("fp8")
class FP8LinearMethod(QuantLinearMethod):

    @property
    def per_channel(self) -> bool:
        return self.cfg.params.get("weight_scheme", "channel") == "channel"

    @property
    def per_token(self) -> bool:
        return self.cfg.params.get("activation_scheme", "token") == "token"

    def quantized_shapes(self, layer: Linear):
        return {"weight": ((layer.out_features, layer.in_features), FP8),
                "weight_scale": ((layer.out_features,), torch.float32)}

    def quantize(self, layer: Linear, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_fp8(weight, self.per_channel)
        return {"weight": q, "weight_scale": scale.expand(weight.shape[0], 1).reshape(-1).contiguous()}

    def load_tensor(self, layer: Linear, kind: str, shard_offset: int, shard_rows: int,
                    tensor: torch.Tensor) -> str | None:
        if kind == "input_scale":
            return None  # activations are scaled dynamically
        return super().load_tensor(layer, kind, shard_offset, shard_rows, tensor)

    def finalize(self, layer: Linear) -> None:
        super().finalize(layer)
        if self.cfg.prequantized and not self.per_channel:
            s = layer.weight_scale.data
            if not bool((s == s[0]).all()):
                # Merged shards with their own per-tensor scales: requantize to one scale.
                w = self.dequantize(layer)
                q, scale = quantize_fp8(w, per_row=False)
                layer.weight.data.copy_(q)
                s.fill_(scale.item())

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale[:, None]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        kernel = self._small_batch_kernel(layer, x) if x.is_cuda else None
        if kernel == "skinny":
            from ember.quant.kernels.skinny_dot import fp8_skinny
            y = fp8_skinny(x, layer.weight, layer.weight_scale)
        elif kernel == "gemv":
            from ember.quant.kernels.fp8_gemv import fp8_gemv_triton
            y = fp8_gemv_triton(x, layer.weight, layer.weight_scale)
        elif x.is_cuda:
            y = self._scaled_mm(layer, x)
        else:
            if self.cfg.params.get("emulate_activations"):
                x2 = x.reshape(-1, x.shape[-1])
                q, s = quantize_fp8(x2, self.per_token)
                x = (q.float() * s).to(x.dtype).reshape(x.shape)
            y = F.linear(x, self.cpu_weight(layer, x.dtype))
        return y if layer.bias is None else y + layer.bias

    def _small_batch_kernel(self, layer: Linear, x: torch.Tensor) -> str | None:
        """Which weight-only kernel serves a few rows (kernels/fp8_gemv.py says why
        weight-only), or None for W8A8 through torch._scaled_mm. One row: the CUDA-core
        GEMV; bf16 inputs of 2..skinny_dot.MAX_ROWS rows: the tensor-core kernel; other
        inputs of at most GEMV_MAX_ROWS: the GEMV (H200, Llama-8B shapes:
        bench/skinny_gpu.py). params["decode_kernel"]: "skinny" (default), "gemv" (no
        tensor cores) or "scaled_mm" (W8A8 at every size)."""
        from ember.quant.kernels.fp8_gemv import GEMV_MAX_ROWS
        from ember.quant.kernels.skinny_dot import MAX_ROWS, fp8_fits
        choice = self.cfg.params.get("decode_kernel", "skinny")
        rows = x.numel() // x.shape[-1]
        if choice == "skinny" and x.dtype == torch.bfloat16 and 2 <= rows <= MAX_ROWS \
                and fp8_fits(layer.in_features):
            return "skinny"
        if choice in ("skinny", "gemv") and rows <= GEMV_MAX_ROWS:
            return "gemv"
        return None

    def _scaled_mm(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.per_token:
            # One launch per layer (kernels/fp8_quant.py), not the reference's nine.
            from ember.quant.kernels.fp8_quant import quantize_fp8_rows
            q, sx = quantize_fp8_rows(x2)
        else:
            q, sx = quantize_fp8(x2, False)
        if self.per_token or self.per_channel:
            # Row-wise scaling: [M, 1] for activations, [1, N] for weights.
            sx = sx.expand(x2.shape[0], 1).contiguous()
            sw = layer.weight_scale.reshape(1, -1)
        else:
            sx, sw = sx.reshape(()), layer.weight_scale[:1].reshape(())
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._scaled_mm(q, layer.weight.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)
