"""Pieces the quantized GEMV/GEMM kernels share: split-K ranges and the reduction of
split partials, and the per-shape choice of tile configs.

Split-K: a 4096-wide layer has only a few hundred output tiles, too few programs to keep
an H200's 132 SMs streaming weights; splitting K multiplies them. Each split writes fp32
partials [SPLIT_K, M, N]; the last split of each tile to finish adds them up in split
order and writes the output (`store_split`, counting arrivals in a per-device counter
array), so no reduce kernel follows: at batch 1 the 96-128 small reduce launches per step
cost ~5-9% of a decode step. EMBER_SPLITK_FIXUP=0 (and graph capture before the counters
exist) falls back to `sum_splits`, one small kernel after the split kernel.
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


@triton.jit
def store_split(acc, y_ptr, part_ptr, cnt_ptr, offs, mask, MN, tile, SPLIT_K: tl.constexpr,
                FIXUP: tl.constexpr):
    """Store this program's fp32 result `acc` for output offsets `offs` (into y [M, N],
    MN = M * N) of output tile `tile`: into y with one split; else as split
    program_id(1)'s partial, and with FIXUP the tile's last split to arrive sums all
    partials (in split order, as sum_splits does) into y and re-zeroes the tile's counter
    for the next launch."""
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + tl.program_id(1) * MN + offs, acc, mask=mask)
        if FIXUP:
            tl.debug_barrier()    # every thread's partial is written before the release
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                # .cg: read at L2, where the other programs' partials are, not a stale L1
                total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                for s in range(1, SPLIT_K):
                    total += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)


FIXUP = os.environ.get("EMBER_SPLITK_FIXUP", "1") == "1"
COUNTER_SLOTS = 1 << 16          # output tiles per launch (a 28672-wide GEMV at 8 rows: 29k)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_buffers(y: torch.Tensor, split: int, tiles: int,
                  in_kernel: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(partials, arrival counters, fixup) for a launch of `tiles` output tiles writing y
    with `split` splits, where the kernel may sum them itself (`in_kernel`):
    partials as split_output; fixup True when the kernel reduces them itself
    (store_split), False when the caller must sum_splits. The counters (zeroed int32,
    one array per device) are made on the first eager call; counters is a placeholder
    pointer when unused."""
    part = split_output(y, split)
    cnt = _COUNTERS.get(y.device)
    want = split > 1 and FIXUP and in_kernel
    if want and cnt is None and not (y.is_cuda and torch.cuda.is_current_stream_capturing()):
        cnt = _COUNTERS[y.device] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=y.device)
    fixup = want and cnt is not None and tiles <= COUNTER_SLOTS
    return part, cnt if fixup else part, fixup


def finish_splits(part: torch.Tensor, y: torch.Tensor, fixup: bool) -> None:
    """After a split kernel: sum the partials unless the kernel did (fixup)."""
    if not fixup:
        sum_splits(part, y)


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


def _time_ms(fn: Callable[[], None], reps: int = 12) -> float:
    """Device time of fn(), replayed from a CUDA graph with L2 flushed before each replay:
    a decode step replays these kernels from a graph with cold weights, and timing eager
    calls would mostly measure Python launch overhead (~20 us against 5-60 us kernels).
    The fastest replay: the noise of one short replay is all upward (clocks, the host),
    and tiles a microsecond apart were ranked by it when this took the mean."""
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")   # 256 MB > L2
    best = float("inf")
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


FINALISTS, FINAL_ROUNDS = 3, 4


def choose_config(key: tuple, candidates: list[tuple], run: Callable[[tuple], None],
                  x: torch.Tensor) -> tuple:
    """The tuned config for `key` (timing each candidate with run(c) the first time, on
    CUDA, outside graph capture); otherwise the first candidate. The FINALISTS fastest are
    timed again, FINAL_ROUNDS times in turn (a drift in clocks meets each alike): tiles
    within a few percent swapped places from one process to the next when one round
    decided (the H200's FP8 GEMV choices in bench/results/h200_2026-11-30m_packed_*)."""
    if key in _TUNED:
        return _TUNED[key]
    if not (AUTOTUNE and x.is_cuda) or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    best = {c: _time_or_inf(lambda c=c: run(c)) for c in candidates}
    finalists = sorted(candidates, key=best.__getitem__)[:FINALISTS]
    for _ in range(FINAL_ROUNDS if len(finalists) > 1 else 0):
        for c in finalists:
            if best[c] < float("inf"):
                best[c] = min(best[c], _time_ms(lambda c=c: run(c)))
    _TUNED[key] = min(finalists, key=best.__getitem__)
    return _TUNED[key]


def _time_or_inf(fn: Callable[[], None]) -> float:
    """_time_ms, or infinity for a tile this GPU cannot run (too much shared memory: the
    compile fails on the first, eager call, before any graph capture)."""
    from triton.runtime.errors import OutOfResources
    try:
        return _time_ms(fn)
    except OutOfResources:
        return float("inf")
