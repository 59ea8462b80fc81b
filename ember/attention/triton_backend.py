"""The `triton` attention backend: Triton kernels for the KV write, decode and prefill.

One step runs at most three launches per layer (plus the split reduce): write K/V, decode
every single-query sequence, then every prefill chunk; a step that verifies or drafts a
tree (fb.attn_masks) adds one tree-attention launch for those sequences. prepare() does all host work once per
step; forward() only launches kernels (no host syncs, so decode can be graph-captured).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.attention.backend import AttentionBackend, sm_count
from ember.attention.triton_decode import choose_num_splits, decode_attention
from ember.attention.triton_kv_write import write_kv_triton
from ember.attention.triton_prefill import build_prefill_tiles, prefill_attention
from ember.attention.triton_tree import build_tree_tiles, tree_attention
from ember.engine.forward_batch import ForwardBatch


@dataclass(frozen=True)
class KernelConfig:
    prefill_block_m: int
    prefill_block_n: int
    prefill_warps: int
    prefill_stages: int
    prefill_prefix_block_n: int  # key tile width over the cached prefix
    decode_block_n: int
    decode_warps: int
    decode_stages: int
    tree_block_m: int            # tree rows per program (trees are small: 16 measured 1.2-1.5x
                                 # faster than 32 for 11-row trees, bench/profile_spec_step.py)
    tree_block_n: int            # key tile width of the tree kernel
    tree_warps: int


# GPU tiles for head_dim <= 128. On the CPU (Triton's interpreter: tests) each op costs about
# a millisecond whatever its size, so fewer, larger tiles run faster.
CUDA_CONFIG = KernelConfig(128, 64, 8, 3, 128, 64, 4, 3, 16, 64, 8)
CPU_CONFIG = KernelConfig(32, 32, 4, 1, 32, 32, 4, 1, 32, 32, 4)


@dataclass
class TritonAttentionMetadata:
    num_decodes: int
    max_decode_len: int                     # host int: picks the number of decode splits
    decode_seq_lens: torch.Tensor | None    # [num_decodes] int32
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32
    seq_lens: torch.Tensor                  # [S] int32
    block_tables: torch.Tensor              # [S, max_blocks] int32
    prefill_tiles: torch.Tensor | None      # [num_tiles, 4] int32, see build_prefill_tiles
    config: KernelConfig
    tree_tiles: torch.Tensor | None = None  # [num_tiles, 6] int32, see build_tree_tiles
    tree_mask: torch.Tensor | None = None   # the tree sequences' masks, flat int8


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_tree_masks = True
    supports_cuda_graphs = True

    def prepare(self, fb: ForwardBatch) -> None:
        dev = fb.block_tables.device
        cfg = CUDA_CONFIG if dev.type == "cuda" else CPU_CONFIG
        nd = fb.num_decodes
        # Already int32 (as a CUDA-graph runner's static buffers are), these are the very same
        # tensors, so a captured graph reads whatever is copied into them before each replay.
        seq_lens = fb.seq_lens.to(torch.int32)
        block_tables = fb.block_tables.to(torch.int32)
        tiles = None
        masked = tuple(i for i, m in enumerate(fb.attn_masks or ()) if m is not None)
        if fb.num_seqs > nd:
            host = build_prefill_tiles(fb.query_start_loc, nd, fb.seq_lens_list, cfg.prefill_block_m)
            if masked:   # tree sequences take the tree kernel
                host = host[~np.isin(host[:, 0], masked)]
            tiles = torch.from_numpy(host).to(dev, non_blocking=True) if len(host) else None
        tree_tiles = tree_mask = None
        if masked:
            host, tree_mask = build_tree_tiles(fb.query_start_loc, fb.attn_masks, cfg.tree_block_m)
            tree_tiles = torch.from_numpy(host).to(dev, non_blocking=True)
            tree_mask = tree_mask.to(dev, non_blocking=True)
        fb.attn_metadata = TritonAttentionMetadata(
            num_decodes=nd,
            max_decode_len=max(fb.seq_lens_list[:nd], default=0),
            decode_seq_lens=seq_lens[:nd] if nd else None,
            decode_block_tables=block_tables[:nd] if nd else None,
            seq_lens=seq_lens,
            block_tables=block_tables,
            prefill_tiles=tiles,
            config=cfg,
            tree_tiles=tree_tiles,
            tree_mask=tree_mask,
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
        meta: TritonAttentionMetadata = fb.attn_metadata
        cfg = meta.config
        write_kv_triton(kv_cache, k, v, fb.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            splits = choose_num_splits(nd, kv_cache.shape[3], meta.max_decode_len, sm_count(q.device))
            decode_attention(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                             scale, splits, out=out[:nd], block_n=cfg.decode_block_n,
                             num_warps=cfg.decode_warps, num_stages=cfg.decode_stages)
        if meta.prefill_tiles is not None:
            prefill_attention(q, k, v, kv_cache, meta.block_tables, meta.seq_lens,
                              meta.prefill_tiles, scale, out, cfg.prefill_block_m,
                              cfg.prefill_block_n, cfg.prefill_warps, cfg.prefill_stages,
                              cfg.prefill_prefix_block_n)
        if meta.tree_tiles is not None:   # K/V already written above
            tree_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.tree_tiles,
                           meta.tree_mask, scale, out, cfg.tree_block_m, cfg.tree_block_n,
                           cfg.tree_warps)
        return out
