"""CUDA graphs for decode and verify steps: capture a set of shapes once, then replay with
padding.

A step of a small model is mostly kernel-launch overhead; replaying a captured graph
removes it. A graph's shape is (batch size, q, w): q = w = 1 is plain decoding (one query
per sequence); q > 1 is a speculative verify step where every sequence computes its last
token and q - 1 drafts (a chain, or a draft tree's nodes), which the graphs run through
the tree-attention kernel with each sequence's [q, w] mask over its last w slots (w = q
for a verify step, a chain's mask causal; w > q for an EAGLE drafter's tree level, whose
rows also see the nodes fed before them) in a static buffer. Any other batch (prefill
chunks, mixed shapes) runs eagerly. Padded rows write their K/V nowhere (slot -1, which
the KV-write kernel skips) and their outputs are dropped.

`capture_graphs=False` keeps every static buffer and prepared batch but replays by running
the model on them eagerly: the same inputs path, testable without a GPU.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ember.attention.backend import AttentionBackend
from ember.engine.forward_batch import ForwardBatch

logger = logging.getLogger("ember")

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

Key = tuple[int, int, int]   # (batch size, query tokens per sequence q, mask width w >= q)


class CudaGraphRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, max_batch: int,
                 max_model_len: int, block_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, verify_widths: tuple[int | tuple[int, int], ...] = (),
                 max_tokens: int | None = None, capture_graphs: bool = True) -> None:
        """verify_widths: the masked shapes to capture besides decoding, each q (a [q, q]
        mask: a verify step of q tokens) or (q, w) (a [q, w] mask); a speculator's, none
        without one or when the backend has no tree masks; max_tokens: the most tokens a
        captured step may hold (the step budget)."""
        self.model, self.backend = model, backend
        self.block_size, self.max_model_len = block_size, max_model_len
        self.capture_graphs = capture_graphs
        self.sizes = [s for s in DEFAULT_CAPTURE_SIZES if s <= max_batch]
        if not self.sizes or self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        tree_masks = getattr(backend, "supports_tree_masks", False)
        shapes = {(v, v) if isinstance(v, int) else tuple(v) for v in verify_widths} if tree_masks else set()
        shapes = sorted((q, w) for q, w in shapes if w > 1 and w >= q)
        cap = max_tokens if max_tokens is not None else self.sizes[-1] * max((q for q, _ in shapes), default=1)
        self.keys: list[Key] = [(bs, 1, 1) for bs in self.sizes]
        self.keys += [(bs, q, w) for q, w in shapes for bs in self.sizes if bs * q <= cap]
        # The captured (q, w) shapes; (1, 1) is decoding.
        self.shapes = ((1, 1), *(sh for sh in shapes if (1, *sh) in self.keys))
        n_seqs, n_tok = self.sizes[-1], max(bs * q for bs, q, _ in self.keys)
        max_blocks = -(-max_model_len // block_size)
        # Static inputs: every replay copies the step's values into these.
        # Input ids, positions and slots: rows of one tensor, filled by one copy when the
        # step's are too (ForwardBatch.token_data).
        self.token_data = torch.zeros((3, n_tok), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.token_data
        self.slot_mapping.fill_(-1)
        self.seq_lens = torch.ones(n_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n_seqs, max_blocks), dtype=torch.int32, device=device)
        self.output = torch.zeros((n_tok, hidden_size), dtype=dtype, device=device)
        # The aux hidden states (EAGLE-3 drafters read them), when the model keeps them.
        self.aux_output: torch.Tensor | None = None
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.batches: dict[Key, ForwardBatch] = {}
        # Shapes whose static mask buffer holds causal masks only (as captured): a causal
        # step (a drafter's catch-up) then copies none.
        self._causal: set[Key] = set()
        self.num_replays: dict[Key, int] = {}

    def _static_batch(self, bs: int, q: int, w: int) -> ForwardBatch:
        # The kernels see the longest possible context, so the split count fixed at capture
        # time suits any length; each sequence's real length is read on the device.
        dev, n = self.input_ids.device, bs * q
        masks = None if w == 1 else [torch.ones((q, w), dtype=torch.bool, device=dev).tril(w - q)] * bs
        return ForwardBatch(
            input_ids=self.input_ids[:n], positions=self.positions[:n],
            slot_mapping=self.slot_mapping[:n], query_start_loc=list(range(0, n + 1, q)),
            seq_lens=self.seq_lens[:bs], seq_lens_list=[self.max_model_len] * bs,
            block_tables=self.block_tables[:bs], num_decodes=bs if w == 1 else 0,
            logits_indices=torch.arange(q - 1, n, q, device=dev),
            block_size=self.block_size, attn_masks=masks)

    def _aux_layers(self) -> tuple[int, ...]:
        return getattr(getattr(self.model, "model", None), "aux_layers", ())

    def _forward(self, key: Key) -> None:
        """The captured work: the model on the static inputs into the static outputs."""
        fb, n = self.batches[key], key[0] * key[1]
        self.output[:n] = self.model(fb.input_ids, fb.positions, fb)
        if self.aux_output is not None:
            self.aux_output[:n] = self.model.model.aux_hidden_states

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape (again, e.g. after the model was asked for aux hidden
        states: the graphs then copy those out too)."""
        self.graphs.clear()
        self.batches.clear()
        aux = self._aux_layers()
        self.aux_output = None if not aux else torch.zeros(
            (self.output.shape[0], len(aux) * self.output.shape[1]), dtype=self.output.dtype,
            device=self.output.device)
        # Largest first, so smaller graphs reuse its memory pool.
        order = sorted(self.keys, key=lambda k: (-k[0] * k[1], -k[1], -k[2]))
        for key in order:
            fb = self._static_batch(*key)
            self.backend.prepare(fb)    # its metadata tensors are the graph's from now on
            self.batches[key] = fb
            if key[1] == key[2] > 1:
                self._causal.add(key)
        if not self.capture_graphs:
            return
        # Every captured row must see a context of at least its mask's width (a masked row
        # reads the last w slots of its sequence), also in the warm-up runs.
        self.seq_lens.fill_(max(w for _, w in self.shapes))
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for key in order:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS picks kernels)
                for _ in range(2):
                    self._forward(key)
                # The LM head runs outside the graphs: its kernels compile and tune here too
                # (a quantized head's tuner would otherwise time tiles in a live step).
                self.model.compute_logits(self.output[:key[0] * key[1]])
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(key)
            self.graphs[key] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s%s", self.sizes,
                    f" and masked shapes (q, w) {list(self.shapes[1:])}" if len(self.shapes) > 1 else "")

    def key_for(self, fb: ForwardBatch) -> Key | None:
        """The captured shape that can run this batch (padded), or None: run it eagerly."""
        n = fb.num_seqs
        if fb.num_decodes == n:
            q = w = 1
        else:
            q = fb.num_tokens // n
            if fb.num_decodes or fb.query_start_loc != list(range(0, n * q + 1, q)):
                return None
            masks = fb.attn_masks or [None] * n
            w = masks[0].shape[1] if masks[0] is not None else q
            # One mask shape for all; no mask (causal) only where the mask is square.
            if any((q, w) != (tuple(m.shape) if m is not None else (q, q)) for m in masks):
                return None
        bs = next((s for s in self.sizes if s >= n), None)
        return None if bs is None or (bs, q, w) not in self.batches else (bs, q, w)

    def run(self, fb: ForwardBatch, key: Key | None = None) -> torch.Tensor:
        """Replay the smallest shape that fits (`key`, from key_for); returns hidden states
        [num_tokens, hidden]."""
        key = key or self.key_for(fb)
        bs, q, w = key
        n, t = fb.num_seqs, fb.num_tokens
        width = fb.block_tables.shape[1]
        if fb.token_data is not None:
            self.token_data[:, :t].copy_(fb.token_data)
        else:
            self.input_ids[:t].copy_(fb.input_ids)
            self.positions[:t].copy_(fb.positions)
            self.slot_mapping[:t].copy_(fb.slot_mapping)
        self.seq_lens[:n].copy_(fb.seq_lens)
        self.block_tables[:n, :width].copy_(fb.block_tables)
        if bs > n:  # padding rows: no K/V write, a w-token context
            self.slot_mapping[t:bs * q].fill_(-1)
            self.seq_lens[n:bs].fill_(w)
        if w > 1:
            self._copy_masks(fb, key)
        if self.capture_graphs:
            self.graphs[key].replay()
        else:
            self._forward(key)
        self.num_replays[key] = self.num_replays.get(key, 0) + 1
        if self.aux_output is not None:
            self.model.model.aux_hidden_states = self.aux_output[:t]
        return self.output[:t]

    def _copy_masks(self, fb: ForwardBatch, key: Key) -> None:
        """Each sequence's [q, w] mask (causal where it has none: then w = q) into the static
        buffer."""
        q = key[1]
        static = self.batches[key].attn_metadata.tree_mask   # [bs * q * w] int8
        masks = fb.attn_masks or [None] * fb.num_seqs
        if all(m is None for m in masks):
            if key not in self._causal:   # every row's, padding included, so it stays causal
                causal = torch.ones((q, q), dtype=torch.int8, device=static.device).tril()
                static[:key[0] * q * q].copy_(causal.reshape(-1).repeat(key[0]))
                self._causal.add(key)
            return
        self._causal.discard(key)
        # Built where the step's masks are (the host, from tree_layout): one copy over.
        where = next((m.device for m in masks if m is not None), torch.device("cpu"))
        causal = torch.ones((q, q), dtype=torch.bool, device=where).tril()
        flat = torch.cat([(m if m is not None else causal).reshape(-1) for m in masks])
        static[:flat.numel()].copy_(flat, non_blocking=True)
