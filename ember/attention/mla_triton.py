"""The `triton` MLA backend (the default on CUDA): the Triton latent write and the Triton
MLA decode kernel (`ember.attention.triton_mla.mla_decode`, same contract as
`mla_decode_ref` plus a split count). forward() launches only kernels for the absorbed
rows, and prepare() fixes the split count on the host, so pure-decode steps can be
captured in a CUDA graph. Expanded prefill chunks use torch SDPA (the base class)."""
from __future__ import annotations

import torch

from ember.attention.backend import sm_count
from ember.attention.mla_backend import MLABackend, MLAMetadata


class TritonMLABackend(MLABackend):
    name = "triton"
    supports_cuda_graphs = True

    def num_splits(self, num_rows: int, max_len: int, device: torch.device) -> int:
        # Imported here, like the kernels below: the module imports triton.
        from ember.attention.triton_mla import choose_num_splits
        return choose_num_splits(num_rows, self.dims.num_heads, max_len, sm_count(device))

    def write_cache(self, cache: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
        from ember.attention.triton_latent_write import write_latent_cache_triton
        write_latent_cache_triton(cache, c_kv, k_pe, slot_mapping)

    def attend_latent(self, q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      meta: MLAMetadata, scale: float) -> torch.Tensor:
        from ember.attention.triton_mla import mla_decode
        return mla_decode(q_lat, q_pe, cache, meta.latent_block_tables, meta.latent_seq_lens,
                          scale, num_splits=meta.num_splits)
