"""The `torch` MLA backend: the reference kernels of mla_ref.py. The CPU path, and the
reference the Triton backend is tested against. Not graph-capturable (the reference
decode reads sequence lengths on the host)."""
from __future__ import annotations

import torch

from ember.attention.mla_backend import MLABackend, MLAMetadata
from ember.attention.mla_ref import mla_decode_ref, write_latent_cache


class TorchMLABackend(MLABackend):
    name = "torch"

    def write_cache(self, cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
        write_latent_cache(cache, c_kv, k_pe, slot_mapping)

    def attend_latent(self, q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      meta: MLAMetadata, scale: float) -> torch.Tensor:
        return mla_decode_ref(q_lat, q_pe, cache, meta.latent_block_tables, meta.latent_seq_lens, scale)
