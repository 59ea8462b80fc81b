"""The one per-step metadata object passed down through the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def long_tensor(values: list[int] | list[list[int]], device: torch.device) -> torch.Tensor:
    """Host ints as a long tensor on `device` by one non-blocking copy (a blocking one, as
    torch.tensor(..., device=...) makes, waits for all the work queued on the device)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class ForwardBatch:
    """Everything a forward pass needs to know about the tokens it computes.

    Sequences are ordered with single-query sequences (decodes, or a 1-token chunk) first,
    so the attention backend can batch them; then the multi-token prefill chunks.
    """

    input_ids: torch.Tensor        # [T] token ids to compute
    positions: torch.Tensor        # [T] absolute position of each token
    slot_mapping: torch.Tensor     # [T] cache slot (block * block_size + offset) to write K/V
    query_start_loc: list[int]     # [S + 1] token offsets of each sequence's queries
    seq_lens: torch.Tensor         # [S] KV length of each sequence after this step
    seq_lens_list: list[int]       # the same, on the host
    block_tables: torch.Tensor     # [S, max_blocks] int, padded with 0
    num_decodes: int               # sequences [0, num_decodes) have exactly one query
    logits_indices: torch.Tensor   # [N] rows of the hidden states that need logits
    block_size: int
    attn_metadata: Any = field(default=None)  # filled by the attention backend's prepare()
    # Tree verification / tree drafting: per sequence, None (causal) or a [n, w] bool mask
    # over the sequence's last w >= n slots (its n new tokens are the last n of them): which
    # of those each new token sees; every slot before them is visible. Positions then repeat
    # across siblings while slots stay consecutive (ember.spec.tree).
    attn_masks: list[torch.Tensor | None] | None = None
    # [3, T] long: input_ids, positions and slot_mapping as the rows of one tensor (what
    # build_forward_batch makes), so a graph replay copies them in one go; None otherwise.
    token_data: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
