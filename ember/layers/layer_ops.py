"""The elementwise ops between the GEMMs, behind one interface.

RMSNorm (with the residual add), RoPE (with Qwen3's per-head q/k norm) and SiLU-and-mul
are cheap in FLOPs but, unfused, cost a launch per PyTorch op: about 25 launches per layer
in a batch-1 decode step, more time than the layer's attention. `TorchLayerOps` is the
null implementation: plain PyTorch, the reference the fused kernels are tested against and
the CPU path. `TritonLayerOps` (triton_layer_ops.py) does each op in one kernel.

Numerics follow transformers exactly in the torch path (fp32 inside, cast back to the
activation dtype at the same points); the Triton kernels round at the same points, so
the two agree to the last bit in fp32 and within rounding in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAYER_KERNELS = ("auto", "torch", "triton")


@dataclass
class RopeStep:
    """One step's rotary inputs, prepared once and read by every layer."""

    positions: torch.Tensor        # [T] long
    cos: torch.Tensor              # torch: [T, 1, head_dim / 2] gathered; triton: the table [max_pos, head_dim / 2]
    sin: torch.Tensor              # same layout as cos


class LayerOps:
    """Interface. Methods may reuse their input buffers for the outputs (the fused kernels
    work in place); callers must not read an input after passing it."""

    name = "base"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [T, d] -> weight * x / rms(x)."""
        raise NotImplementedError

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, d] -> (rms_norm(x + residual), x + residual)."""
        raise NotImplementedError

    def rope_step(self, cos_table: torch.Tensor, sin_table: torch.Tensor,
                  positions: torch.Tensor) -> RopeStep:
        """tables: [max_pos, head_dim / 2] fp32; positions: [T]. Done once per forward."""
        raise NotImplementedError

    def rope(self, step: RopeStep, q: torch.Tensor, k: torch.Tensor,
             q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
             eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, d]; k: [T, kv_heads, d] (views into the qkv output are fine).
        With q_norm / k_norm ([d] weights), each head is RMS-normalized first (Qwen3).
        Rotate-half (neox) layout."""
        raise NotImplementedError

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2 * d] holding gate then up -> silu(gate) * up, [T, d]."""
        raise NotImplementedError


class TorchLayerOps(LayerOps):
    """The null implementation and the reference: plain PyTorch, transformers' numerics."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # fp32 inside, cast back before the weight, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + residual
        return self.rms_norm(x, weight, eps), x

    def rope_step(self, cos_table: torch.Tensor, sin_table: torch.Tensor,
                  positions: torch.Tensor) -> RopeStep:
        return RopeStep(positions, cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1))

    def rope(self, step: RopeStep, q: torch.Tensor, k: torch.Tensor,
             q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
             eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        if q_norm is not None:
            q = self.rms_norm(q, q_norm, eps)
        if k_norm is not None:
            k = self.rms_norm(k, k_norm, eps)
        return _rotate(q, step.cos, step.sin), _rotate(k, step.cos, step.sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


TORCH_LAYER_OPS = TorchLayerOps()


def get_layer_ops(name: str, device: torch.device) -> LayerOps:
    """`auto` is triton on CUDA (when triton imports) and torch elsewhere."""
    if name not in LAYER_KERNELS:
        raise ValueError(f"unknown layer kernels {name!r}; choose one of {', '.join(LAYER_KERNELS)}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TORCH_LAYER_OPS
    try:
        from ember.layers.triton_layer_ops import TritonLayerOps
    except ImportError as e:
        if name == "auto":
            return TORCH_LAYER_OPS
        raise ValueError(f"--layer-kernels triton needs triton ({e})") from e
    return TritonLayerOps()
