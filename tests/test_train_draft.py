"""train-draft's pieces on a tiny random Llama: initialisation from the target, the top-k
KL, and a few steps of distillation lowering it; plus the CLI flag parsing."""
from __future__ import annotations

import torch
from conftest import TinyCheckpoint

from ember.spec.distill import teacher_topk, topk_kl
from ember.spec.train_draft import init_draft


def test_init_copies_the_target_and_distillation_lowers_kl(tiny_llama: TinyCheckpoint) -> None:
    target = tiny_llama.hf_model
    cfg = target.config.to_dict()
    draft = init_draft(target, cfg, num_layers=1)
    assert torch.equal(draft.model.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)
    assert len(draft.model.layers) == 1

    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(3, 256, (8, 32), generator=g)
    ids, probs = teacher_topk(target, chunks, batch=4, top_k=16, log=lambda *_: None)
    assert ids.shape == probs.shape == (8, 32, 16)
    # The target against its own top-k: KL 0.
    with torch.no_grad():
        assert topk_kl(target(chunks).logits, ids, probs).item() < 1e-2

    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3)
    with torch.no_grad():
        before = topk_kl(draft(chunks).logits, ids, probs).item()
    for _ in range(30):
        loss = topk_kl(draft(chunks).logits, ids, probs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = topk_kl(draft(chunks).logits, ids, probs).item()
    assert after < 0.7 * before


def test_cli_takes_speculative_config() -> None:
    from ember.cli import build_parser, engine_kwargs
    args = build_parser().parse_args(
        ["generate", "hi", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    kw = engine_kwargs(args)
    from ember.config import EngineConfig
    cfg = EngineConfig(model="x", **kw)
    assert cfg.speculative_config.method == "ngram"
    assert cfg.speculative_config.num_speculative_tokens == 2
    args = build_parser().parse_args(["train-draft", "--text", "a.txt", "--out", "d"])
    assert args.num_layers == 2 and args.train_fraction == 0.8
