"""Programmatic dependent launch (PDL, Hopper and later) for the batch-1 decode kernels.

A decode step at batch 1 is ~330 short kernels, each of which normally starts only after
the one before it has fully finished, and then waits a DRAM round trip for its first
weights. With PDL, a kernel launched with `launch_pdl=True` may start while its
predecessor drains: every Triton kernel of a decode layer (RMSNorm, RoPE, the KV write,
decode attention and its reduce, SiLU-mul, the GEMVs) is launched so, and calls
`gdc_launch_dependents()` as it starts (its successor may then be scheduled as soon as all
of its programs run) and `gdc_wait()`, which blocks until the predecessor has finished and
its writes are visible, before touching memory the predecessor may write. The GEMVs wait
only after requesting their first weight tile (weights are never written by an earlier
kernel). Both instructions are no-ops for kernels launched without PDL.

`EMBER_PDL=0` turns it off (A/B runs); it is never used by the CPU interpreter.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """True when kernels on t's device should use programmatic dependent launch."""
    if not t.is_cuda or os.environ.get("EMBER_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _device_supports_pdl(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_launch(t: torch.Tensor) -> dict[str, object]:
    """Launch options and the PDL constexpr for a kernel that waits on its predecessor."""
    on = pdl_enabled(t)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
