"""Pieces the quantized GEMV/GEMM kernels share: split-K ranges and the reduction of
split partials, and the per-shape choice of tile configs.

Split-K: a 4096-wide layer has only a few hundred output tiles, too few programs to keep
an H200's 132 SMs streaming weights; splitting K multiplies them. Each split writes fp32
partials [SPLIT_K, M, N] that `sum_splits` adds up and casts in one small kernel.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def k_range(K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [start, end) columns of split program_id(1): whole BLOCK_K tiles, shared out
    evenly (the last splits may be empty)."""
    tiles = (K + BLOCK_K - 1) // BLOCK_K
    per = (tiles + SPLIT_K - 1) // SPLIT_K
    start = tl.program_id(1) * per * BLOCK_K
    return start, tl.minimum(start + per * BLOCK_K, K)


@triton.jit
def _sum_splits_kernel(part_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * MN + i, mask=mask, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)


def rows_and_output(x: torch.Tensor, k_in: int, n_out: int,
                    max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear kernel's input as rows [M, K] with unit column stride, and its output
    [M, N] in x's dtype (allocated only: launchers stay CUDA-graph capturable). Raises if
    the kernel serves at most `max_rows` rows and x has more."""
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if max_rows is not None and x2.shape[0] > max_rows:
        raise ValueError(f"this kernel serves at most {max_rows} rows, got {x2.shape[0]}")
    return x2, torch.empty((x2.shape[0], n_out), dtype=x.dtype, device=x.device)


def split_output(y: torch.Tensor, split: int) -> torch.Tensor:
    """Where split kernels write: y itself with one split, else fp32 partials
    [split, *y.shape]."""
    return y if split == 1 else torch.empty((split, *y.shape), dtype=torch.float32, device=y.device)


def sum_splits(part: torch.Tensor, y: torch.Tensor) -> None:
    """y = part.sum(0) cast to y's dtype; nothing to do when part is y (one split)."""
    if part is y:
        return
    mn = y.numel()
    _sum_splits_kernel[(triton.cdiv(mn, 1024),)](part, y, mn, SPLIT_K=part.shape[0], BLOCK=1024)


# On CUDA the first call per shape key (eager, e.g. CUDA-graph warm-up) times every
# candidate (replayed from a CUDA graph, cold L2) and keeps the fastest.
# EMBER_QUANT_AUTOTUNE=0 uses the first candidate.
AUTOTUNE = os.environ.get("EMBER_QUANT_AUTOTUNE", "1") == "1"
_TUNED: dict[tuple, tuple] = {}


def _time_ms(fn: Callable[[], None], reps: int = 8) -> float:
    """Device time of fn(), replayed from a CUDA graph with L2 flushed before each replay:
    a decode step replays these kernels from a graph with cold weights, and timing eager
    calls would mostly measure Python launch overhead (~20 us against 5-60 us kernels)."""
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")   # 256 MB > L2
    total = 0.0
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end)
    return total / reps


def choose_config(key: tuple, candidates: list[tuple], run: Callable[[tuple], None],
                  x: torch.Tensor) -> tuple:
    """The tuned config for `key` (timing each candidate with run(c) the first time, on
    CUDA, outside graph capture); otherwise the first candidate."""
    if key in _TUNED:
        return _TUNED[key]
    if not (AUTOTUNE and x.is_cuda) or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    _TUNED[key] = min(candidates, key=lambda c: _time_or_inf(lambda: run(c)))
    return _TUNED[key]


def _time_or_inf(fn: Callable[[], None]) -> float:
    """_time_ms, or infinity for a tile this GPU cannot run (too much shared memory: the
    compile fails on the first, eager call, before any graph capture)."""
    from triton.runtime.errors import OutOfResources
    try:
        return _time_ms(fn)
    except OutOfResources:
        return float("inf")
