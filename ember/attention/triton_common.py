"""Pieces shared by the Triton attention kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32 (acc is fp32). UPCAST feeds fp32 operands instead:
    Triton 3.6's CPU interpreter multiplies bf16 tiles as raw integers."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_flags(q: torch.Tensor) -> dict[str, object]:
    """Kernel constexprs for mma(): exact fp32 products for fp32 inputs (tf32 would cost
    ~3e-4 relative error); the interpreter workaround for bf16 on the CPU."""
    return {"PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "UPCAST": (not q.is_cuda) and q.dtype == torch.bfloat16}
