"""CUDA graphs for decode steps: capture a set of batch sizes once, then replay with padding.

A decode step of a small model is mostly kernel-launch overhead; replaying a captured
graph removes it. Only pure-decode batches (one query per sequence) replay; anything else
runs eagerly. Padded rows write their K/V nowhere (slot -1, which the KV-write kernel
skips) and their outputs are dropped.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ember.attention.backend import AttentionBackend
from ember.engine.forward_batch import ForwardBatch

logger = logging.getLogger("ember")

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CudaGraphRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, max_batch: int,
                 max_model_len: int, block_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.backend = model, backend
        self.block_size, self.max_model_len = block_size, max_model_len
        self.sizes = [s for s in DEFAULT_CAPTURE_SIZES if s <= max_batch]
        if not self.sizes or self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        n, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        # Static inputs: every replay copies the step's values into these.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.output = torch.zeros((n, hidden_size), dtype=dtype, device=device)
        # The aux hidden states (EAGLE-3 drafters read them), when the model keeps them.
        self.aux_output: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.batches: dict[int, ForwardBatch] = {}

    def _static_batch(self, bs: int) -> ForwardBatch:
        # The kernels see the longest possible context, so the split count fixed at capture
        # time suits any length; each sequence's real length is read on the device.
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            slot_mapping=self.slot_mapping[:bs], query_start_loc=list(range(bs + 1)),
            seq_lens=self.seq_lens[:bs], seq_lens_list=[self.max_model_len] * bs,
            block_tables=self.block_tables[:bs], num_decodes=bs,
            logits_indices=torch.arange(bs, device=self.input_ids.device),
            block_size=self.block_size)

    def _aux_layers(self) -> tuple[int, ...]:
        return getattr(getattr(self.model, "model", None), "aux_layers", ())

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size (again, e.g. after the model was asked for aux hidden
        states: the graphs then copy those out too)."""
        self.graphs.clear()
        self.batches.clear()
        n = self.sizes[-1]
        aux = self._aux_layers()
        self.aux_output = None if not aux else torch.zeros(
            (n, len(aux) * self.output.shape[1]), dtype=self.output.dtype, device=self.output.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            fb = self._static_batch(bs)
            self.backend.prepare(fb)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS picks kernels)
                for _ in range(2):
                    self.model(fb.input_ids, fb.positions, fb)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.output[:bs] = self.model(fb.input_ids, fb.positions, fb)
                if self.aux_output is not None:
                    self.aux_output[:bs] = self.model.model.aux_hidden_states
            self.graphs[bs] = graph
            self.batches[bs] = fb
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.num_decodes == fb.num_seqs and fb.num_seqs <= self.sizes[-1]

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Replay the smallest graph that fits; returns hidden states [num_seqs, hidden]."""
        n = fb.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        width = fb.block_tables.shape[1]
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.slot_mapping[:n].copy_(fb.slot_mapping)
        self.seq_lens[:n].copy_(fb.seq_lens)
        self.block_tables[:n, :width].copy_(fb.block_tables)
        if bs > n:  # padding rows: no K/V write, a 1-token context
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        if self.aux_output is not None:
            self.model.model.aux_hidden_states = self.aux_output[:n]
        return self.output[:n]
