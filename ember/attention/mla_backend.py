"""The MLA (multi-head latent attention) backend interface, its registry, and the work
both implementations share.

MLA is a KV layout plus an attention backend. The layout (`LatentKVSpec`, mla_ref.py)
keeps one row per token: the normalized latent c_kv [R] and the rotated rope key k_pe [P].
Keys and values are never cached per head; they are `kv_b_proj` applied to c_kv:
    k_nope[h] = W_UK[h] c_kv      (W_UK[h]: [dn, R])
    v[h]      = W_UV[h] c_kv      (W_UV[h]: [dv, R])
so attention can run either way:

- absorbed: fold W_UK into the query (q_lat[h] = W_UK[h]^T q_nope[h], [R]), attend over
  the cached latent rows directly (scores = q_lat . c_kv + q_pe . k_pe; the output is a
  weighted sum of c_kv), then apply W_UV. Nothing per head is materialized; each query
  reads the whole latent context. This is every decode.
- expanded: up-project the context's latent rows to per-head K [L, H, dn + P] and
  V [L, H, dv] and run ordinary causal attention. The up-projection is paid once per
  chunk and shared by its queries.

Which one a prefill chunk takes is `prefers_absorbed`: a roofline estimate of both (FLOPs
at the GPU's FLOP/byte ratio plus bytes moved). The up-projection costs ~2*R*H*(dn + dv)
FLOPs per context token whatever the chunk size, the absorbed path ~2*H*(2R + P) FLOPs
and (R + P) bytes per context token *per query*, so absorbed wins for chunks that are
tiny next to their context (speculative verification, the tail of a chunked prompt):
with DeepSeek-V2-Lite's shapes chunks of up to ~35 queries over a long prefix, with V3's
(128 heads) up to ~150; fresh prompts (no prefix) of more than ~16 (V2-Lite) or ~70 (V3)
tokens are expanded.

Implementations differ only in their kernels: `torch` (mla_torch.py, the reference and
CPU path) and `triton` (mla_triton.py: the Triton latent write and MLA decode kernel, CUDA
graph capturable). Expanded chunks use torch SDPA in both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.attention.backend import AttentionBackendBase
from ember.attention.mla_ref import gather_latent
from ember.engine.forward_batch import ForwardBatch

PREFILL_MODES = ("auto", "absorbed", "expanded")
# bf16 dense FLOP/s over HBM bytes/s of an H200 (~790 TFLOP/s measured, 4.8 TB/s): moving
# a byte takes about as long as this many FLOPs.
FLOPS_PER_BYTE = 160
ELEM_BYTES = 2   # bf16 activations and cache


@dataclass(frozen=True)
class MLADims:
    num_heads: int
    kv_lora_rank: int       # R: the cached latent
    qk_nope_head_dim: int   # dn
    qk_rope_head_dim: int   # P: the cached, shared rope key
    v_head_dim: int         # dv


def prefill_cost(n: int, seq_len: int, dims: MLADims, absorbed: bool) -> float:
    """Estimated time of a chunk of n queries (the last n of seq_len keys), in
    byte-equivalents: FLOPs / FLOPS_PER_BYTE + bytes moved. Rough on purpose; it only has to
    rank the two paths."""
    h, r, p = dims.num_heads, dims.kv_lora_rank, dims.qk_rope_head_dim
    dn, dv, ctx = dims.qk_nope_head_dim, dims.v_head_dim, seq_len
    if absorbed:
        # W_UK into the query and W_UV after; scores against [c_kv, k_pe] and the sum over c_kv.
        flops = 2 * n * h * r * (dn + dv) + 2 * n * ctx * h * (2 * r + p)
        moved = n * ctx * (r + p) * ELEM_BYTES          # every query reads the latent context
    else:
        # Up-project every context row, then attention over per-head K [dn + P] and V [dv].
        flops = 2 * ctx * r * h * (dn + dv) + 2 * n * ctx * h * (dn + p + dv)
        moved = (ctx * (r + p) + 2 * ctx * h * (dn + p + dv)) * ELEM_BYTES   # K, V written then read
    return flops / FLOPS_PER_BYTE + moved


def prefers_absorbed(n: int, seq_len: int, dims: MLADims) -> bool:
    return prefill_cost(n, seq_len, dims, True) < prefill_cost(n, seq_len, dims, False)


@dataclass
class MLAMetadata:
    """One step's plan, built once by prepare() and read by every layer."""

    # Rows attended in the latent space: the decodes, then every token of the absorbed chunks.
    num_latent_rows: int
    latent_index: torch.Tensor | None       # [A] token rows; None: rows [0, num_latent_rows)
    latent_seq_lens: torch.Tensor | None    # [A] int32: keys each row sees (its position + 1)
    latent_block_tables: torch.Tensor | None  # [A, max_blocks] int32: its sequence's table
    max_latent_len: int                     # host int: sizes the decode kernel's splits
    num_splits: int
    # Chunks that take the expanded path: (sequence, first token row, end token row).
    expanded: list[tuple[int, int, int]] = field(default_factory=list)


class MLABackend(AttentionBackendBase):
    """Attention over the paged latent cache for one model's MLA shapes.

    Subclasses provide the kernels: `write_cache` and `attend_latent`."""

    def __init__(self, dims: MLADims, prefill_mode: str = "auto") -> None:
        if prefill_mode not in PREFILL_MODES:
            raise ValueError(f"unknown MLA prefill mode {prefill_mode!r}; choose one of {PREFILL_MODES}")
        self.dims = dims
        # auto: per chunk by prefers_absorbed; absorbed / expanded force one path (tests, benchmarks).
        self.prefill_mode = prefill_mode

    # ---- kernels ------------------------------------------------------------------------
    def write_cache(self, cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
        """cache: [num_blocks, block_size, R + P]; c_kv: [T, R]; k_pe: [T, P]; slot_mapping: [T]."""
        raise NotImplementedError

    def attend_latent(self, q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      meta: MLAMetadata, scale: float) -> torch.Tensor:
        """q_lat: [A, H, R] (W_UK folded in); q_pe: [A, H, P] -> [A, H, R]: each row's
        softmax-weighted sum of c_kv over its meta.latent_seq_lens keys."""
        raise NotImplementedError

    def num_splits(self, num_rows: int, max_len: int, device: torch.device) -> int:
        """Splits of the context for the decode kernel (host ints only)."""
        return 1

    # ---- per step -----------------------------------------------------------------------
    def _absorb(self, n: int, seq_len: int) -> bool:
        if self.prefill_mode != "auto":
            return self.prefill_mode == "absorbed"
        return prefers_absorbed(n, seq_len, self.dims)

    def prepare(self, fb: ForwardBatch) -> None:
        nd, qsl, lens = fb.num_decodes, fb.query_start_loc, fb.seq_lens_list
        absorbed, expanded = [], []
        for i in range(nd, fb.num_seqs):
            n = qsl[i + 1] - qsl[i]
            if self._absorb(n, lens[i]):
                absorbed.append(i)
            else:
                expanded.append((i, qsl[i], qsl[i + 1]))
        # Already int32 (a CUDA-graph runner's static buffers), these are the same tensors,
        # so a captured graph reads whatever is copied into them before each replay.
        seq_lens = fb.seq_lens.to(torch.int32)
        tables = fb.block_tables.to(torch.int32)
        index, lat_lens, lat_tables = None, seq_lens[:nd], tables[:nd]
        num_rows, max_len = nd, max(lens[:nd], default=0)
        if absorbed:
            # Each token of an absorbed chunk is a decode-like row over keys up to itself.
            rows, seqs, row_lens = list(range(nd)), list(range(nd)), list(lens[:nd])
            for i in absorbed:
                n = qsl[i + 1] - qsl[i]
                rows.extend(range(qsl[i], qsl[i + 1]))
                seqs.extend([i] * n)
                row_lens.extend(range(lens[i] - n + 1, lens[i] + 1))
            dev = tables.device
            index = torch.tensor(rows).to(dev)
            lat_lens = torch.tensor(row_lens, dtype=torch.int32).to(dev)
            lat_tables = tables[torch.tensor(seqs).to(dev)]
            num_rows, max_len = len(rows), max(row_lens)
        fb.attn_metadata = MLAMetadata(
            num_latent_rows=num_rows, latent_index=index,
            latent_seq_lens=lat_lens if num_rows else None,
            latent_block_tables=lat_tables if num_rows else None,
            max_latent_len=max_len,
            num_splits=self.num_splits(num_rows, max_len, tables.device) if num_rows else 1,
            expanded=expanded)

    # ---- per layer ----------------------------------------------------------------------
    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                k_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                fb: ForwardBatch, scale: float) -> torch.Tensor:
        """Write the new latent rows, then attend causally over each sequence's context.

        q_nope: [T, H, dn]; q_pe: [T, H, P] (rotated); c_kv: [T, R] (normalized);
        k_pe: [T, P] (rotated); kv_b_weight: [H * (dn + dv), R], kv_b_proj's weight;
        cache: [num_blocks, block_size, R + P]. Returns [T, H, dv].
        """
        meta: MLAMetadata = fb.attn_metadata
        d = self.dims
        self.write_cache(cache, c_kv, k_pe, fb.slot_mapping)
        w = kv_b_weight.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        w_uk, w_uv = w[:, :d.qk_nope_head_dim], w[:, d.qk_nope_head_dim:]   # [H, dn, R], [H, dv, R]
        out = q_nope.new_empty((q_nope.shape[0], d.num_heads, d.v_head_dim))
        n, idx = meta.num_latent_rows, meta.latent_index
        if n:
            qn = q_nope[:n] if idx is None else q_nope[idx]
            qp = q_pe[:n] if idx is None else q_pe[idx]
            # Views with unit stride along the last dim: what the kernels take.
            q_lat = torch.bmm(qn.transpose(0, 1), w_uk).transpose(0, 1)    # [n, H, R]
            o_lat = self.attend_latent(q_lat, qp, cache, meta, scale)      # [n, H, R]
            o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [n, H, dv]
            if idx is None:
                out[:n] = o
            else:
                out[idx] = o
        for i, start, end in meta.expanded:
            out[start:end] = self.expanded_chunk(q_nope[start:end], q_pe[start:end], c_kv[start:end],
                                                 k_pe[start:end], kv_b_weight, cache, fb, i, scale)
        return out

    def expanded_chunk(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                       k_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                       fb: ForwardBatch, i: int, scale: float) -> torch.Tensor:
        """Sequence i's chunk of n queries (positions [ctx, ctx + n)) through per-head K/V.

        q_nope: [n, H, dn]; q_pe: [n, H, P]; c_kv: [n, R]; k_pe: [n, P] -> [n, H, dv]."""
        d = self.dims
        n, seq_len = q_nope.shape[0], fb.seq_lens_list[i]
        ctx = seq_len - n
        if ctx == 0:
            c, pe = c_kv, k_pe   # nothing cached before: the chunk's own rows suffice
        else:
            lat = gather_latent(cache, fb.block_tables[i], seq_len).to(q_nope.dtype)  # [L, R + P]
            c, pe = lat[:, :d.kv_lora_rank], lat[:, d.kv_lora_rank:]
        kv = F.linear(c, kv_b_weight).view(seq_len, d.num_heads, -1)   # [L, H, dn + dv]
        k = torch.cat([kv[..., :d.qk_nope_head_dim],
                       pe[:, None, :].expand(seq_len, d.num_heads, d.qk_rope_head_dim)], dim=-1)
        v = kv[..., d.qk_nope_head_dim:]
        q = torch.cat([q_nope, q_pe], dim=-1)                          # [n, H, dn + P]
        mask = None
        if ctx:
            pos = torch.arange(ctx, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]   # [n, L]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None, scale=scale)
        return o[0].transpose(0, 1)   # [n, H, dv]


def get_mla_backend(name: str, device: torch.device | None, dims: MLADims,
                    prefill_mode: str = "auto") -> MLABackend:
    """`auto` is triton on CUDA and torch elsewhere (as for the paged backends)."""
    if name == "auto":
        name = "triton" if device is not None and device.type == "cuda" else "torch"
    if name == "torch":
        from ember.attention.mla_torch import TorchMLABackend
        return TorchMLABackend(dims, prefill_mode)
    if name == "triton":
        from ember.attention.mla_triton import TritonMLABackend
        return TritonMLABackend(dims, prefill_mode)
    raise ValueError(f"unknown attention backend {name!r}; available: auto, torch, triton")
