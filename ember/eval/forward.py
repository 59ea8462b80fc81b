"""One-sequence forwards outside the scheduler, through the engine's own model, paged KV
cache and attention backend (for perplexity and calibration)."""
from __future__ import annotations

import torch

from ember.engine.forward_batch import ForwardBatch


@torch.inference_mode()
def sequence_logits(llm, token_ids: list[int], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [len(rows), vocab] (fp32) at positions `rows` (default: all) of one sequence
    computed as a single prefill from position 0."""
    engine, runner = llm.engine, llm.engine.runner
    n, bs = len(token_ids), runner.block_size
    engine.prefix_cache.reset()  # cached prefixes may hold blocks; nothing else is running
    blocks = engine.block_pool.allocate(-(-n // bs))
    table = torch.tensor([blocks], dtype=torch.int32, device=runner.device)
    pos = torch.arange(n, device=runner.device)
    rows = pos if rows is None else rows.to(runner.device)
    try:
        fb = ForwardBatch(
            input_ids=torch.tensor(token_ids, device=runner.device), positions=pos,
            slot_mapping=table[0, pos // bs].long() * bs + pos % bs,
            query_start_loc=[0, n], seq_lens=torch.tensor([n], device=runner.device),
            seq_lens_list=[n], block_tables=table, num_decodes=int(n == 1),
            logits_indices=rows, block_size=bs)
        runner.backend.prepare(fb)
        hidden = runner.model(fb.input_ids, fb.positions, fb)
        return runner.model.compute_logits(hidden[rows])
    finally:
        engine.block_pool.free(blocks)
