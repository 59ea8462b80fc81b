"""Plain-PyTorch paged attention: runs on the CPU and is the reference for the Triton kernels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.backend import AttentionBackend
from ember.engine.forward_batch import ForwardBatch


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, blocks, block_size, kv_heads, d]; k, v: [T, kv_heads, d]; slot_mapping: [T]."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_table: [S, nb] -> K, V each [S, nb * block_size, kv_heads, d]."""
    s, nb = block_table.shape
    blocks = kv_cache[:, block_table]  # [2, S, nb, block_size, kv_heads, d]
    kv = blocks.reshape(2, s, nb * kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4])
    return kv[0], kv[1]


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: list[int], query_start_loc: list[int], scale: float,
                        q_chunk: int = 1024) -> torch.Tensor:
    """Plain fp32 paged attention, one sequence at a time: the reference for the Triton kernels.

    q: [T, heads, d]; sequence i's queries are rows [query_start_loc[i], query_start_loc[i + 1])
    at the last positions of its seq_lens[i] keys, all of which (new ones too) are in the cache.
    Returns fp32 [T, heads, d]. Queries go q_chunk rows at a time to bound the score matrix.
    """
    heads, kv_heads = q.shape[1], kv_cache.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        nb = -(-seq_len // kv_cache.shape[2])
        keys, values = gather_kv(kv_cache, block_tables[i:i + 1, :nb].long())
        keys = keys[0, :seq_len].float().repeat_interleave(heads // kv_heads, dim=1)  # [L, heads, d]
        values = values[0, :seq_len].float().repeat_interleave(heads // kv_heads, dim=1)
        for a in range(start, end, q_chunk):
            b = min(a + q_chunk, end)
            pos = seq_len - (end - a) + torch.arange(b - a, device=q.device)  # absolute positions
            scores = torch.einsum("qhd,khd->hqk", q[a:b].float(), keys) * scale
            visible = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]
            probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            out[a:b] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


@dataclass
class TorchAttentionMetadata:
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks_of_decodes]
    decode_mask: torch.Tensor | None         # [num_decodes, 1, 1, kv_len] True = attend


class TorchAttentionBackend(AttentionBackend):
    """Decodes are batched into one masked SDPA; prefill chunks go one sequence at a time."""

    name = "torch"
    supports_tree_masks = True

    def prepare(self, fb: ForwardBatch) -> None:
        nd = fb.num_decodes
        if nd == 0:
            fb.attn_metadata = TorchAttentionMetadata(None, None)
            return
        max_len = max(fb.seq_lens_list[:nd])
        nb = -(-max_len // fb.block_size)
        table = fb.block_tables[:nd, :nb]
        kv_len = nb * fb.block_size
        mask = torch.arange(kv_len, device=table.device)[None, :] < fb.seq_lens[:nd, None]
        fb.attn_metadata = TorchAttentionMetadata(table, mask[:, None, None, :])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
        write_kv(kv_cache, k, v, fb.slot_mapping)
        out = torch.empty_like(q)
        meta: TorchAttentionMetadata = fb.attn_metadata
        nd = fb.num_decodes
        if nd:
            kc, vc = gather_kv(kv_cache, meta.decode_block_table)
            o = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2),                     # [nd, heads, 1, d]
                kc.transpose(1, 2).to(q.dtype), vc.transpose(1, 2).to(q.dtype),
                attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
            out[:nd] = o.squeeze(2)
        for i in range(nd, fb.num_seqs):
            start, end = fb.query_start_loc[i], fb.query_start_loc[i + 1]
            out[start:end] = self._prefill_one(q[start:end], k[start:end], v[start:end],
                                               kv_cache, fb, i, scale)
        return out

    @staticmethod
    def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                     fb: ForwardBatch, i: int, scale: float) -> torch.Tensor:
        """One chunk: q [n, heads, d] at positions [ctx, ctx + n), ctx = tokens already cached."""
        n = q.shape[0]
        seq_len = fb.seq_lens_list[i]
        ctx = seq_len - n
        tail = fb.attn_masks[i] if fb.attn_masks is not None else None   # [n, w] or None
        tail = tail.to(q.device) if tail is not None else None
        if ctx == 0:
            keys, values, mask = k, v, tail  # nothing cached: the chunk's own K/V suffice
        else:
            nb = -(-seq_len // fb.block_size)
            keys, values = gather_kv(kv_cache, fb.block_tables[i:i + 1, :nb])
            keys, values = keys[0, :seq_len].to(q.dtype), values[0, :seq_len].to(q.dtype)
            if tail is None:
                q_pos = torch.arange(ctx, seq_len, device=q.device)
                mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, seq_len]
            else:   # a tree: everything before the mask's slots, then what the mask allows
                head = torch.ones((n, seq_len - tail.shape[1]), dtype=torch.bool, device=q.device)
                mask = torch.cat([head, tail], 1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
            scale=scale, enable_gqa=True)  # [1, heads, n, d]
        return o[0].transpose(0, 1)
