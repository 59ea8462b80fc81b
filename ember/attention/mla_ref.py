"""Torch reference for MLA (multi-head latent attention) over the paged latent KV cache.

The MLA KV layout stores, per token and layer, one row of `kv_lora_rank + rope_dim` values:
the compressed latent c_kv (after its RMSNorm) followed by the rotated shared rope key k_pe.
One layer's cache is `[num_blocks, block_size, kv_lora_rank + rope_dim]`; there is no head
axis and no separate V: with weight absorption the latent is both the key (against the
absorbed query) and the value (W_UV is applied after attention).

Absorbed decode, per sequence and head h:
    score_t = (q_nope_absorbed[h] . c_kv_t + q_rope[h] . k_pe_t) * scale
    out[h]  = sum_t softmax(score)_t * c_kv_t            # [kv_lora_rank], still latent

The Triton kernel (`ember.attention.triton_mla.mla_decode`) has the same signature and is
tested against `mla_decode_ref`.
"""
from __future__ import annotations

import torch


def write_latent_cache(cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """cache: [num_blocks, block_size, R + P]; c_kv: [T, R]; k_pe: [T, P]; slot_mapping: [T].

    Writes each new token's latent and rope key at its slot (block * block_size + offset)."""
    flat = cache.view(-1, cache.shape[-1])
    rank = c_kv.shape[-1]
    flat[slot_mapping, :rank] = c_kv.to(cache.dtype)
    flat[slot_mapping, rank:] = k_pe.to(cache.dtype)


def gather_latent(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first seq_len cache rows: [seq_len, R + P]."""
    bs = cache.shape[1]
    blocks = block_table[: -(-seq_len // bs)].long()
    return cache[blocks].reshape(-1, cache.shape[-1])[:seq_len]


def mla_decode_ref(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode, one query token per sequence.

    q_nope: [B, H, R] query already multiplied by W_UK (absorbed into the latent space)
    q_rope: [B, H, P] rotated rope part of the query
    cache: [num_blocks, block_size, R + P]
    block_tables: [B, max_blocks] int; seq_lens: [B] int (KV length including this token)
    returns out: [B, H, R] in q_nope's dtype (the latent-space attention output)
    """
    rank = q_nope.shape[-1]
    if out is None:
        out = torch.empty_like(q_nope)
    lens = seq_lens.tolist()
    for b, n in enumerate(lens):
        kv = gather_latent(cache, block_tables[b], int(n)).float()   # [n, R + P]
        c, pe = kv[:, :rank], kv[:, rank:]
        scores = (q_nope[b].float() @ c.T + q_rope[b].float() @ pe.T) * scale   # [H, n]
        out[b] = (torch.softmax(scores, dim=-1) @ c).to(out.dtype)
    return out
