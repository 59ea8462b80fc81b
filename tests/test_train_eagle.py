"""train-eagle's pieces on the tiny Llama: the unrolled training rows compute exactly what
the drafter computes when it drafts through the paged cache (EAGLE-3 chains and P-EAGLE
mask rows), a few steps lower the loss, and the CLI end to end writes a loadable folder."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TinyCheckpoint

from ember.attention.torch_ref import TorchAttentionBackend
from ember.engine.model_runner import build_forward_batch
from ember.spec.eagle import default_aux_layers, load_eagle
from ember.spec.train_eagle import (_BestWeights, step_attentions, warm_start, _cache_fits, _cache_key, _cache_meta, _train_steps,
                                    draft_loss, draft_vocabulary, engine_continuations, greedy_features,
                                    new_drafter, sampled_rows, spread_prefixes, target_features)


@pytest.fixture(scope="module")
def setup(tiny_llama: TinyCheckpoint):
    target = tiny_llama.hf_model
    cfg = target.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    n_layers = cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(3, 256, (6, 24), generator=g)
    feats = target_features(target, chunks, default_aux_layers(n_layers), 3, 8, log=lambda *_: None)
    return target, cfg, chunks, feats


def _drafter(setup, parallel: bool, vocab: int = 256, layers: int = 1):
    target, cfg, chunks, feats = setup
    ids = draft_vocabulary(chunks, feats["ids"], 256, vocab)
    d = new_drafter(target, cfg, ids, parallel, 3, seed=1, layers=layers)
    with torch.no_grad():   # larger weights than the init so attention matters
        for name, p in d.named_parameters():
            if p.dim() == 2 and "lm_head" not in name:
                p.normal_(0, 0.15)
        if parallel:
            d.mask_embed.normal_(0, 1.0)
            d.mask_hidden.normal_(0, 1.0)
    vmap = torch.full((256,), -1, dtype=torch.long)
    vmap[ids] = torch.arange(len(ids))
    return d, vmap


@pytest.mark.parametrize("parallel,layers", [(False, 1), (True, 1), (False, 2), (True, 3)],
                         ids=["eagle3-ttt", "peagle", "eagle3-ttt-2-layers", "peagle-3-layers"])
def test_training_rows_equal_paged_drafting(setup, parallel: bool, layers: int) -> None:
    """Row s of base b in training == what the drafter computes at inference for the same
    inputs: the pairs up to b in the cache, then rows 2..s one decode step each (deeper
    drafters: every layer with its own cache and its own training attention)."""
    _, _, chunks, feats = setup
    d, _ = _drafter(setup, parallel, layers=layers)
    steps, l = 3, chunks.shape[1]
    tokens, aux = chunks[:1], feats["aux"][:1].float()
    # Training: all bases at once.
    attend = step_attentions(d, 1, l)
    base = torch.arange(l)
    hidden = d.fuse(aux[0])
    rows = []
    with torch.no_grad():
        for s in range(1, steps + 1):
            shift = torch.clamp(base + s, max=l - 1)
            if s > 1 and parallel:
                e, hidden = d.mask_embed.expand(l, -1), d.mask_hidden.expand(l, -1)
            else:
                e = d.embed(tokens[0, shift])
            hidden = d(e, hidden, base + s - 1, attend)
            rows.append(hidden)
    # Inference, for a few bases.
    backend = TorchAttentionBackend()
    assert len(d.attention_layers()) == layers
    for a in d.attention_layers():
        a.backend = backend
        a.kv_cache = torch.zeros(2, 16, 4, d.midlayer.self_attn.num_kv_heads, d.midlayer.self_attn.head_dim)
    blocks = list(range(16))
    cpu = torch.device("cpu")
    for b in [0, 5, 13]:
        with torch.no_grad():
            fb = build_forward_batch([(blocks, 0, tokens[0, 1:b + 2].tolist())], 4, cpu)
            backend.prepare(fb)
            o = d(d.embed(fb.input_ids), d.fuse(aux[0, :b + 1]), fb.positions, d.paged(fb))
            torch.testing.assert_close(o, rows[0][:b + 1], atol=1e-5, rtol=1e-5)
            prev = o[-1:]
            for s in range(2, steps + 1):
                fb = build_forward_batch([(blocks, b + s - 1, [int(tokens[0, b + s])])], 4, cpu)
                backend.prepare(fb)
                if parallel:
                    e, h = d.mask_embed[None], d.mask_hidden[None]
                else:
                    e, h = d.embed(fb.input_ids), prev
                prev = d(e, h, fb.positions, d.paged(fb))
                torch.testing.assert_close(prev[0], rows[s - 1][b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallel", [False, True], ids=["eagle3-ttt", "peagle"])
def test_a_few_steps_lower_the_loss(setup, parallel: bool) -> None:
    _, _, _, feats = setup
    d, vmap = _drafter(setup, parallel, vocab=64)
    batch = {k: feats[k][:4] for k in ("tokens", "aux", "ids", "probs")}
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        before, _ = draft_loss(d, batch, vmap, 3, parallel)
    for _ in range(25):
        loss, accs = draft_loss(d, batch, vmap, 3, parallel)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(accs) == 3
    assert loss.item() < 0.7 * before.item()
    assert d.lm_head.weight.grad is not None and d.fc.weight.grad is not None
    assert all(p.grad is None for p in setup[0].parameters())   # the target stays frozen


def test_greedy_features_are_the_targets_own_continuation(setup) -> None:
    """Self-distillation: the prefix is kept, every later token is the target's argmax after
    the tokens before it, and the features collected while generating equal one full
    forward over the finished sequences (what target_features gives for text)."""
    target, cfg, chunks, _ = setup
    aux_layers = default_aux_layers(cfg["num_hidden_layers"])
    prefixes = chunks[:5, :7]
    feats = greedy_features(target, prefixes, 20, aux_layers, 2, 8, log=lambda *_: None)
    tokens = feats["tokens"]
    assert tokens.shape == (5, 20) and torch.equal(tokens[:, :7], prefixes)
    full = target_features(target, tokens, aux_layers, 5, 8, log=lambda *_: None)
    with torch.no_grad():
        argmax = target(tokens).logits.argmax(-1)          # [5, 20]
    assert torch.equal(tokens[:, 7:], argmax[:, 6:-1])
    assert torch.equal(feats["ids"][..., 0], full["ids"][..., 0])
    torch.testing.assert_close(feats["aux"].float(), full["aux"].float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(feats["probs"].float(), full["probs"].float(), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError):
        greedy_features(target, prefixes, 7, aux_layers, 2, 8, log=lambda *_: None)


def test_spread_prefixes_cover_the_stream() -> None:
    ids = torch.arange(100)
    p = spread_prefixes(ids, 4, 10)
    assert p[:, 0].tolist() == [0, 30, 60, 90] and torch.equal(p[1], torch.arange(30, 40))
    with pytest.raises(ValueError):
        spread_prefixes(torch.arange(5), 1, 10)


def test_draft_vocabulary_prefers_frequent_then_low_ids() -> None:
    tokens = torch.tensor([[5, 5, 5, 9, 9, 7]])
    ids = torch.tensor([[[9]], [[9]], [[9]], [[1]], [[1]], [[1]]]).view(1, 6, 1)
    # counts: 9 -> 5, 5 -> 3, 1 -> 3, 7 -> 1; then unseen ids, lowest first.
    assert draft_vocabulary(tokens, ids, 20, 4).tolist() == [1, 5, 7, 9]
    assert draft_vocabulary(tokens, ids, 20, 6).tolist() == [0, 1, 2, 5, 7, 9]
    assert draft_vocabulary(tokens, ids, 20, 20).tolist() == list(range(20))


def test_cli_trains_and_writes_a_loadable_folder(smollm2_gguf_path, tmp_path) -> None:
    """A few steps on the real SmolLM2 over a little text: the folder loads as a drafter
    for the target, and the features cache is reused by the parallel mode."""
    from ember.cli import build_parser
    from ember.models.loader import resolve_model
    pytest.importorskip("gguf")
    text = tmp_path / "t.txt"
    text.write_text("Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry. " * 40)
    cache = str(tmp_path / "feats.safetensors")
    common = ["--target", "smollm2-135m", "--text", str(text), "--seq-len", "32",
              "--max-train-tokens", "128", "--batch-size", "2", "--eval-chunks", "2",
              "--draft-vocab-size", "512", "--features-cache", cache]
    logs = []
    e_out = str(tmp_path / "e")
    # The parallel run: two layers, warm-started from the EAGLE-3 drafter just trained.
    for mode in ([], ["--parallel", "--parallel-positions", "3", "--draft-layers", "2", "--init-from", e_out]):
        out = str(tmp_path / ("p" if mode else "e"))
        args = build_parser().parse_args(["train-eagle", "--out", out, "--steps", "2"] + common + mode)
        from ember.spec.train_eagle import train
        report = train(args, log=logs.append)
        assert report["steps"] == 2 and os.path.isfile(os.path.join(out, "train_log.json"))
        drafter = load_eagle(out, resolve_model("smollm2-135m").config)
        assert drafter.config.draft_vocab_size == 512
        assert drafter.config.parallel == bool(mode)
        assert drafter.config.aux_layers == (2, 15, 27)
        assert len(drafter.attention_layers()) == (2 if mode else 1)
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["architectures"] == ["LlamaForCausalLMEagle3"]
    # The warm-started drafter kept the EAGLE-3 drafter's draft vocabulary.
    assert torch.equal(load_eagle(e_out, resolve_model("smollm2-135m").config).d2t, drafter.d2t)
    assert any(line.startswith("warm start: 11 tensors copied") for line in logs)
    assert any(line.startswith("features from") for line in logs)   # the second run reused them
    out = str(tmp_path / "sd")
    args = build_parser().parse_args(["train-eagle", "--out", out, "--steps", "1", "--self-distill",
                                      "--prompt-len", "8", "--heldout", "greedy"] + common)
    logs.clear()
    report = train(args, log=logs.append)
    assert report["self_distill"] and report["train_tokens"] == 128
    assert not any(line.startswith("features from") for line in logs)   # text features do not fit
    assert any("own tokens" in line for line in logs) and any("(transformers)" in line for line in logs)
    assert report["heldout"] == "greedy"


def test_greedy_heldout_continues_held_out_prefixes_with_the_argmax(setup) -> None:
    """--heldout greedy: --eval-chunks prefixes spread over the held-out tokens, each then
    continued by the target's own argmax (every generated token is the top-1 label of the
    position before it); --heldout text: chunks of the held-out tokens themselves."""
    import argparse
    from ember.spec.train_eagle import heldout_features
    target, cfg, chunks, _ = setup
    held_ids = chunks.flatten()                                   # 144 "held-out" tokens
    args = argparse.Namespace(heldout="greedy", eval_chunks=3, prompt_len=5, seq_len=12, feature_batch=2,
                              top_k=4)
    aux_layers = default_aux_layers(cfg["num_hidden_layers"])
    g = heldout_features(args, target, held_ids, aux_layers, torch.device("cpu"))
    assert g["tokens"].shape == (3, 12) and g["ids"].shape == (3, 12, 4)
    assert torch.equal(g["tokens"][:, :5], spread_prefixes(held_ids, 3, 5))
    assert torch.equal(g["tokens"][:, 5:], g["ids"][:, 4:-1, 0].to(g["tokens"].dtype))
    # Its features are the teacher-forced pass's over the same tokens.
    ref = target_features(target, g["tokens"], aux_layers, 3, 4, log=lambda *_: None)
    assert torch.equal(ref["ids"][..., 0], g["ids"][..., 0])
    args.heldout = "text"
    t = heldout_features(args, target, held_ids, aux_layers, torch.device("cpu"))
    assert t["tokens"].shape == (3, 12) and torch.equal(t["tokens"][0], held_ids[:12])
    assert not torch.equal(t["tokens"][:, 5:], t["ids"][:, 4:-1, 0].to(t["tokens"].dtype))


def test_sliced_labels_match_the_masked_reference(setup) -> None:
    """draft_loss takes row s's labels by slicing (no host sync); the same loss and
    accuracies as selecting the valid bases with a boolean mask, written out here."""
    _, _, _, feats = setup
    d, vmap = _drafter(setup, False, vocab=64)
    batch = {k: feats[k][:3] for k in ("tokens", "aux", "ids", "probs")}
    with torch.no_grad():
        loss, accs = draft_loss(d, batch, vmap, 3, False)
        b, l = batch["tokens"].shape
        attend = step_attentions(d, b, l)
        base = torch.arange(l)
        hidden = d.fuse(batch["aux"].float().view(b * l, -1))
        total, ref_accs = 0.0, []
        for s in range(1, 4):
            shift = torch.clamp(base + s, max=l - 1)
            o = d(d.embed(batch["tokens"][:, shift].reshape(-1)), hidden, (base + s - 1).repeat(b), attend)
            valid = base + s <= l - 1
            logits = d.compute_logits(o.view(b, l, -1)[:, valid])
            ids = vmap[batch["ids"][:, shift[valid]].long()]
            p = batch["probs"][:, shift[valid]].float() * (ids >= 0)
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-6)
            total += 0.8 ** (s - 1) * -(p * torch.log_softmax(logits, -1).gather(-1, ids.clamp(min=0))).sum(-1).mean()
            top = batch["ids"][:, shift[valid], 0].long()
            ref_accs.append((d.to_target_ids(logits.argmax(-1)) == top).float().mean())
            hidden = o
    torch.testing.assert_close(loss, total / (1 + 0.8 + 0.64))
    torch.testing.assert_close(accs, torch.stack(ref_accs))


@pytest.mark.parametrize("parallel", [False, True], ids=["eagle3-ttt", "peagle"])
def test_bf16_autocast_step_keeps_fp32_master_weights(setup, parallel: bool) -> None:
    """What CUDA training does, on the CPU's bf16 autocast: the loss is close to fp32's,
    the gradients land on the fp32 weights, and a step changes them."""
    _, _, _, feats = setup
    d, vmap = _drafter(setup, parallel, vocab=64)
    batch = {k: feats[k][:4] for k in ("tokens", "aux", "ids", "probs")}
    with torch.no_grad():
        ref, _ = draft_loss(d, batch, vmap, 3, parallel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, accs = draft_loss(d, batch, vmap, 3, parallel)
    assert loss.dtype == torch.float32 and accs.shape == (3,)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
    assert d.fc.weight.dtype == torch.float32 and d.fc.weight.grad.dtype == torch.float32
    before = d.lm_head.weight.detach().clone()
    torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-3).step()
    assert not torch.equal(before, d.lm_head.weight)


def test_train_steps_stop_at_steps_and_at_the_deadline(setup) -> None:
    """The loop stops after --steps, reads every loss back, and does no step once the
    deadline has passed."""
    import argparse
    import time
    _, _, _, feats = setup
    d, vmap = _drafter(setup, False, vocab=64)
    params = [p for p in d.parameters() if p.requires_grad]
    args = argparse.Namespace(batch_size=2, steps=5, epochs=1000, lr=1e-3, warmup=2, log_every=2, parallel=False,
                              loss_decay=0.8, eval_every=2)
    opt = torch.optim.AdamW(params, lr=args.lr)
    logs, evaluated = [], []
    cpu = torch.device("cpu")
    losses, step, epoch, _ = _train_steps(d, opt, params, feats, vmap, 3, args, cpu, time.time() + 60, logs.append,
                                          checkpoint=evaluated.append)
    assert step == 5 and len(losses) == 5 and epoch == 2   # 6 sequences: 3 steps an epoch
    assert len(logs) == 2 and all(x > 0 for x in losses) and evaluated == [2, 4]
    args.steps = 0
    losses, step, _, _ = _train_steps(d, opt, params, feats, vmap, 3, args, cpu, time.time() - 1, logs.append)
    assert step == 0 and losses == []


def test_sampled_rows_spread_a_fraction() -> None:
    assert sampled_rows(6, 0.5).tolist() == [False, True, False, True, False, True]
    assert sampled_rows(5, 0.0).sum() == 0 and sampled_rows(5, 1.0).all()
    assert int(sampled_rows(1000, 0.3).sum()) == 300


def test_cache_key_is_the_one_forward_takes(setup) -> None:
    """The KV cache keyword exists in this transformers version's forward and its output
    (the wrong one would be swallowed by **kwargs and the cache dropped)."""
    import inspect
    target = setup[0]
    key = _cache_key(target)
    assert key in inspect.signature(target.forward).parameters
    with torch.no_grad():
        out = target(torch.tensor([[5, 6, 7]]), use_cache=True)
    assert getattr(out, key) is not None


def test_sampled_continuations_are_reproducible_and_features_still_exact(setup) -> None:
    """With a temperature, the sampled rows leave the greedy path (seeded: the same twice),
    the greedy rows stay the argmax, and the features are still the full forward's."""
    target, cfg, chunks, _ = setup
    aux_layers = default_aux_layers(cfg["num_hidden_layers"])
    prefixes = chunks[:4, :6]
    kw = dict(log=lambda *_: None, temperature=1.5, sampled_fraction=0.5, seed=3)
    a = greedy_features(target, prefixes, 16, aux_layers, 4, 8, **kw)
    b = greedy_features(target, prefixes, 16, aux_layers, 4, 8, **kw)
    assert torch.equal(a["tokens"], b["tokens"])
    with torch.no_grad():
        argmax = target(a["tokens"]).logits.argmax(-1)
    greedy = a["tokens"][:, 6:] == argmax[:, 5:-1]
    assert greedy[0::2].all() and not greedy[1::2].all()     # rows 1, 3 are the sampled ones
    full = target_features(target, a["tokens"], aux_layers, 4, 8, log=lambda *_: None)
    torch.testing.assert_close(a["aux"].float(), full["aux"].float(), atol=2e-3, rtol=2e-3)
    assert torch.equal(a["ids"][..., 0], full["ids"][..., 0])


def test_engine_continuations_equal_the_transformers_greedy_ones(tiny_llama: TinyCheckpoint, setup) -> None:
    """ember's engine continues the prefixes exactly as the transformers target does
    (greedy, fp32 on the CPU); sampled rows are reproducible from the seed."""
    target, cfg, chunks, _ = setup
    prefixes = chunks[:3, :5]
    cpu = torch.device("cpu")
    toks = engine_continuations(tiny_llama.path, prefixes, 14, cpu, max_num_seqs=2, log=lambda *_: None)
    ref = greedy_features(target, prefixes, 14, default_aux_layers(cfg["num_hidden_layers"]), 3, 4,
                          log=lambda *_: None)["tokens"]
    assert toks.shape == (3, 14) and torch.equal(toks, ref)
    s1 = engine_continuations(tiny_llama.path, prefixes, 14, cpu, temperature=1.5, sampled_fraction=1.0,
                              seed=7, log=lambda *_: None)
    s2 = engine_continuations(tiny_llama.path, prefixes, 14, cpu, temperature=1.5, sampled_fraction=1.0,
                              seed=7, log=lambda *_: None)
    assert torch.equal(s1, s2) and not torch.equal(s1, ref)
    with pytest.raises(ValueError):
        engine_continuations(tiny_llama.path, prefixes, 5, cpu, log=lambda *_: None)
    # A spent budget still runs the first round (4 x max_num_seqs prompts), then stops.
    six = chunks[:6, :5]
    cut = engine_continuations(tiny_llama.path, six, 9, cpu, max_num_seqs=1, budget_s=1e-9, log=lambda *_: None)
    full = engine_continuations(tiny_llama.path, six, 9, cpu, max_num_seqs=1, log=lambda *_: None)
    assert cut.shape == (4, 9) and full.shape == (6, 9) and torch.equal(cut, full[:4])


def test_features_cache_fits_only_the_same_settings() -> None:
    """A cache is reused only for the same prefixes and generation settings."""
    import argparse
    args = argparse.Namespace(self_distill=True, prompt_len=4, seq_len=8, distill_temperature=0.0,
                              distill_sampled_fraction=1.0, top_k=2)
    source = torch.arange(12).view(3, 4)
    meta = _cache_meta(args, (1, 2))
    f = {"tokens": torch.cat([source, source], 1), "ids": torch.zeros(3, 8, 2), **meta}
    assert _cache_fits(f, source, args, meta)
    assert not _cache_fits(f, source + 1, args, meta)
    cut = dict(f, tokens=f["tokens"][:2])                 # a generation budget kept 2 rows
    assert _cache_fits(cut, source, args, meta) and not _cache_fits(cut, source[1:], args, meta)
    args.distill_temperature = 0.7
    assert not _cache_fits(f, source, args, _cache_meta(args, (1, 2)))
    old = {k: v for k, v in f.items() if k not in ("temperature", "sampled_fraction", "top_k")}
    args.distill_temperature = 0.0
    assert _cache_fits(old, source, args, _cache_meta(args, (1, 2)))   # written before these fields


def test_best_weights_restore_the_best_held_out_step(setup) -> None:
    d, _ = _drafter(setup, False, vocab=64)
    best = _BestWeights(d, [0.1, 0.1])
    assert not best.offer([0.05, 0.1], 5)
    kept = d.lm_head.weight.detach().clone()
    assert best.offer([0.3, 0.2], 10)
    with torch.no_grad():
        d.lm_head.weight.add_(1.0)
    assert not best.offer([0.2, 0.2], 20)
    assert best.restore() == [0.3, 0.2] and best.step == 10
    assert torch.equal(d.lm_head.weight, kept)


def test_warm_start_copies_what_fits_and_deeper_layers_start_as_the_identity(setup) -> None:
    """A P-EAGLE drafter of three layers started from a one-layer EAGLE-3 drafter: fc, the
    first layer, norm and head copied, the mask state and further layers fresh, and since
    those layers start as the identity its first rows compute exactly the EAGLE drafter's."""
    _, _, chunks, feats = setup
    eagle, _ = _drafter(setup, False)
    target, cfg = setup[0], setup[1]
    ids = eagle.to_target_ids(torch.arange(eagle.config.draft_vocab_size))
    deep = new_drafter(target, cfg, ids, True, 3, seed=2, layers=3)
    mask_before = deep.mask_hidden.detach().clone()
    warm_start(deep, eagle, log=lambda *_: None)
    for name, t in eagle.state_dict().items():
        torch.testing.assert_close(deep.state_dict()[name], t, atol=0, rtol=0)
    assert torch.equal(deep.mask_hidden, mask_before)
    assert all(not layer.self_attn.o_proj.weight.any() for layer in deep.more_layers)
    l = chunks.shape[1]
    with torch.no_grad():
        rows = [d(d.embed(chunks[0, 1:]), d.fuse(feats["aux"][0, :l - 1].float()), torch.arange(l - 1),
                  step_attentions(d, 1, l - 1)) for d in (eagle, deep)]
    torch.testing.assert_close(rows[0], rows[1], atol=1e-6, rtol=1e-6)
