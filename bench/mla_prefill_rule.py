"""Checks the MLA backend's absorbed-vs-expanded rule (`prefers_absorbed`) on a GPU: one
prefill chunk of n queries after a cached prefix, timed through the Triton MLA backend
with each path forced, next to the path the rule picks.

    python bench/mla_prefill_rule.py [--contexts 1024 8192] [--chunks 1 4 16 32 64 128 256 512]

Shapes: DeepSeek-V2-Lite (16 heads) and V3 (128 heads), R = 512, P = 64, dn = dv = 128, bf16.
A row "rule ok" is no when the rule picked the slower path; near the crossover either is fine.
"""
from __future__ import annotations

import argparse

import torch

from ember.attention.mla_backend import MLADims, get_mla_backend, prefers_absorbed
from ember.engine.forward_batch import ForwardBatch

SHAPES = {"v2-lite": MLADims(16, 512, 128, 64, 128), "v3": MLADims(128, 512, 128, 64, 128)}
BLOCK = 16


def time_chunk(dims: MLADims, ctx: int, n: int, mode: str, reps: int) -> float:
    """Milliseconds per backend.forward for one chunk of n queries over ctx + n keys."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    seq_len = ctx + n
    nb = -(-seq_len // BLOCK)
    table = torch.randperm(nb + 8, device=dev)[:nb].int()[None]
    cache = torch.randn((nb + 8, BLOCK, dims.kv_lora_rank + dims.qk_rope_head_dim), device=dev, dtype=dt)
    pos = torch.arange(ctx, seq_len, device=dev)
    fb = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.long, device=dev), positions=pos,
        slot_mapping=table[0, pos // BLOCK].long() * BLOCK + pos % BLOCK, query_start_loc=[0, n],
        seq_lens=torch.tensor([seq_len], device=dev), seq_lens_list=[seq_len], block_tables=table,
        num_decodes=0, logits_indices=torch.tensor([n - 1], device=dev), block_size=BLOCK)
    h = dims.num_heads
    args = dict(q_nope=torch.randn((n, h, dims.qk_nope_head_dim), device=dev, dtype=dt),
                q_pe=torch.randn((n, h, dims.qk_rope_head_dim), device=dev, dtype=dt),
                c_kv=torch.randn((n, dims.kv_lora_rank), device=dev, dtype=dt),
                k_pe=torch.randn((n, dims.qk_rope_head_dim), device=dev, dtype=dt),
                kv_b_weight=torch.randn((h * (dims.qk_nope_head_dim + dims.v_head_dim), dims.kv_lora_rank),
                                        device=dev, dtype=dt) * 0.05,
                cache=cache, fb=fb, scale=0.1)
    backend = get_mla_backend("triton", dev, dims, prefill_mode=mode)
    backend.prepare(fb)
    for _ in range(3):
        backend.forward(**args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        backend.forward(**args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"{'shape':<8} {'prefix':>7} {'chunk':>6} {'absorbed ms':>12} {'expanded ms':>12} {'rule':>9} {'rule ok':>8}")
    for name, dims in SHAPES.items():
        for ctx in args.contexts:
            for n in args.chunks:
                a = time_chunk(dims, ctx, n, "absorbed", args.reps)
                e = time_chunk(dims, ctx, n, "expanded", args.reps)
                rule = prefers_absorbed(n, ctx + n, dims)
                ok = "yes" if rule == (a < e) else "no"
                print(f"{name:<8} {ctx:>7} {n:>6} {a:>12.3f} {e:>12.3f} "
                      f"{'absorbed' if rule else 'expanded':>9} {ok:>8}", flush=True)


if __name__ == "__main__":
    main()
