"""A pure function of fixed-shape device tensors, replayed from CUDA graphs.

Small per-step tensor programs (a speculative step's tree selection and greedy verdict:
ember.spec.device_tree) are dozens of tiny kernels whose launches cost the host more than
the device spends on them. Captured once per input signature, each becomes one graph
launch plus a copy per input. The function must be pure (no side effects: the warm-up
before capture runs it too), make no host-device sync, and return tensors (the same
tensors, refilled, at every replay: read them before the next call). Elsewhere than on
CUDA, or with `capture=False` (the engine's enforce_eager), it is simply called.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Key = tuple[Any, ...]


class GraphedCall:
    """`fn` behind a cache of CUDA graphs, one per input signature (see the module docstring)."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], device: torch.device,
                 capture: bool = True, max_graphs: int = 64) -> None:
        self.fn = fn
        self.capture = capture and device.type == "cuda"
        self.max_graphs = max_graphs
        self._graphs: dict[Key, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self._pool = None

    def __call__(self, *inputs: torch.Tensor, **static: Any) -> tuple[torch.Tensor, ...]:
        """fn(*inputs, **static); `static` (hashable values) is part of the graph's key."""
        if not self.capture:
            return self.fn(*inputs, **static)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs) + tuple(sorted(static.items()))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:   # shapes beyond the cap run eagerly
                return self.fn(*inputs, **static)
            entry = self._capture(key, inputs, static)
        graph, static_inputs, outputs = entry
        for dst, src in zip(static_inputs, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return outputs

    def _capture(self, key: Key, inputs: tuple[torch.Tensor, ...], static: dict[str, Any]):
        static_inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm up: compiles, lazy tables, library handles
            self.fn(*static_inputs, **static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(*static_inputs, **static)
        self._graphs[key] = (graph, static_inputs, outputs)
        return self._graphs[key]
