"""The EAGLE-3 drafter: the target's aux hidden states (parity with transformers), a tiny
checkpoint in the published layout loaded and run through ember's paged attention against
a from-scratch dense reference of the architecture, the reduced draft vocabulary, saving
in the same layout, and P-EAGLE's mask positions in one forward vs one at a time."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCheckpoint

from ember.attention.torch_ref import TorchAttentionBackend
from ember.config import ModelConfig
from ember.engine.model_runner import build_forward_batch
from ember.models.loader import build_model, resolve_model
from ember.spec.eagle import EagleDrafter, load_eagle, save_eagle

H, HEADS, KV_HEADS, D, INTER = 64, 4, 2, 16, 96
VOCAB, DRAFT_VOCAB = 256, 40
AUX = [0, 1, 2]


# ---- the target's aux hidden states -----------------------------------------------------
@pytest.mark.parametrize("name", ["llama-gqa", "qwen3"])
def test_aux_hidden_states_match_transformers(tiny_checkpoints, name: str) -> None:
    ckpt: TinyCheckpoint = tiny_checkpoints(name)
    source = resolve_model(ckpt.path)
    model = build_model(source, TorchAttentionBackend(), torch.device("cpu"), torch.float32)
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(2, 8, 16, source.config.num_key_value_heads, source.config.head_dim)
    ids = torch.randint(3, VOCAB, (11,), generator=torch.Generator().manual_seed(0))
    fb = build_forward_batch([([0], 0, ids.tolist())], 16, torch.device("cpu"))
    TorchAttentionBackend().prepare(fb)
    with torch.no_grad():
        plain = model(fb.input_ids, fb.positions, fb)
        assert model.model.aux_hidden_states is None
        model.set_aux_hidden_layers((0, 1, 2))
        with_aux = model(fb.input_ids, fb.positions, fb)
        ref = ckpt.hf_model(ids[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(with_aux, plain)   # the output itself is unchanged
    aux = model.model.aux_hidden_states.view(11, 3, -1)
    # transformers: hidden_states[j] enters layer j (its last entry is after the final
    # norm, so layer 2 = num_layers is compared before the norm: the stream itself).
    torch.testing.assert_close(aux[:, 0], ref[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux[:, 1], ref[1][0], atol=1e-5, rtol=1e-5)
    norm = ckpt.hf_model.model.norm
    torch.testing.assert_close(norm(aux[:, 2]), ref[2][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.set_aux_hidden_layers((2, 1))
    model.set_aux_hidden_layers(())
    assert torch.equal(model(fb.input_ids, fb.positions, fb), plain)


# ---- a tiny checkpoint in the published layout -----------------------------------------
def _published_tensors(seed: int, parallel: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.15
    w = {
        "fc.weight": r(H, 3 * H),
        "midlayer.self_attn.q_proj.weight": r(HEADS * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": r(KV_HEADS * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": r(KV_HEADS * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": r(H, HEADS * D),
        "midlayer.mlp.gate_proj.weight": r(INTER, H),
        "midlayer.mlp.up_proj.weight": r(INTER, H),
        "midlayer.mlp.down_proj.weight": r(H, INTER),
        "midlayer.input_layernorm.weight": 1 + r(H),
        "midlayer.hidden_norm.weight": 1 + r(H),
        "midlayer.post_attention_layernorm.weight": 1 + r(H),
        "norm.weight": 1 + r(H),
        "lm_head.weight": r(DRAFT_VOCAB, H) * 5,
    }
    # Draft id i -> target id 3 + 5 i (d2t holds the offset).
    target_ids = 3 + 5 * torch.arange(DRAFT_VOCAB)
    w["d2t"] = target_ids - torch.arange(DRAFT_VOCAB)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[target_ids] = True
    w["t2d"] = t2d
    if parallel:
        w["mask_embed"] = r(H)
        w["mask_hidden"] = r(3 * H)   # vLLM's layout: before fc
    return w


def _write_checkpoint(folder: str, tensors: dict[str, torch.Tensor], parallel: bool = False,
                      layers: int = 1) -> str:
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "head_dim": D, "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "max_position_embeddings": 256, "vocab_size": VOCAB, "draft_vocab_size": DRAFT_VOCAB,
           "target_hidden_size": H, "eagle_config": {"eagle_aux_hidden_state_layer_ids": AUX,
                                                     "use_aux_hidden_state": True}}
    if parallel:
        cfg.update(parallel_drafting=True, parallel_positions=4)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def _target_config() -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
                                  "hidden_size": H, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2})


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    ang = pos[:, None].float() * inv[None]                      # [T, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def reference_eagle(w, embed: torch.Tensor, next_tokens: torch.Tensor, hidden: torch.Tensor,
                    positions: torch.Tensor, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3 written out densely for one sequence (causal over its rows): -> (o, logits
    over the target vocabulary, -inf off the draft vocabulary)."""
    fused = hidden @ w["fc.weight"].T if fuse else hidden
    x = torch.cat([_rms(embed[next_tokens], w["midlayer.input_layernorm.weight"]),
                   _rms(fused, w["midlayer.hidden_norm.weight"])], -1)
    t = x.shape[0]
    q = _rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(t, HEADS, D), positions)
    k = _rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(t, KV_HEADS, D), positions)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(t, KV_HEADS, D)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    a = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, HEADS * D)
    h = a @ w["midlayer.self_attn.o_proj.weight"].T + fused
    y = _rms(h, w["midlayer.post_attention_layernorm.weight"])
    m = (F.silu(y @ w["midlayer.mlp.gate_proj.weight"].T) * (y @ w["midlayer.mlp.up_proj.weight"].T))
    o = m @ w["midlayer.mlp.down_proj.weight"].T + h
    small = _rms(o, w["norm.weight"]) @ w["lm_head.weight"].T
    full = torch.full((t, VOCAB), float("-inf"))
    full[:, torch.arange(DRAFT_VOCAB) + w["d2t"]] = small
    return o, full


def _attention_ref(x: torch.Tensor, w, prefix: str, positions: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of layer `prefix` over x's rows, o_proj applied."""
    t = x.shape[0]
    q = _rope((x @ w[f"{prefix}.self_attn.q_proj.weight"].T).view(t, HEADS, D), positions)
    k = _rope((x @ w[f"{prefix}.self_attn.k_proj.weight"].T).view(t, KV_HEADS, D), positions)
    v = (x @ w[f"{prefix}.self_attn.v_proj.weight"].T).view(t, KV_HEADS, D)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    a = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, HEADS * D)
    return a @ w[f"{prefix}.self_attn.o_proj.weight"].T


def reference_deep_layer(w, prefix: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A plain pre-norm Llama layer (a deeper drafter's layers 1..) written out densely."""
    h = _attention_ref(_rms(x, w[f"{prefix}.input_layernorm.weight"]), w, prefix, positions) + x
    y = _rms(h, w[f"{prefix}.post_attention_layernorm.weight"])
    return (F.silu(y @ w[f"{prefix}.mlp.gate_proj.weight"].T) * (y @ w[f"{prefix}.mlp.up_proj.weight"].T)) \
        @ w[f"{prefix}.mlp.down_proj.weight"].T + h


def _bind_cache(drafter: EagleDrafter, blocks: int = 16, bs: int = 4) -> None:
    for layer in drafter.attention_layers():
        layer.kv_cache = torch.zeros(2, blocks, bs, KV_HEADS, D)


@pytest.fixture(scope="module")
def embedding() -> torch.nn.Embedding:
    torch.manual_seed(3)
    e = torch.nn.Embedding(VOCAB, H)
    e.weight.requires_grad_(False)
    return e


def test_published_layout_loads_and_matches_the_reference(tmp_path, embedding) -> None:
    w = _published_tensors(0)
    folder = _write_checkpoint(str(tmp_path / "eagle3"), w)
    backend = TorchAttentionBackend()
    drafter = load_eagle(folder, _target_config(), backend)
    drafter.share_embedding(embedding)
    assert drafter.config.aux_layers == (0, 1, 2) and drafter.config.draft_vocab_size == DRAFT_VOCAB
    _bind_cache(drafter)
    g = torch.Generator().manual_seed(1)
    n = 9
    nxt = torch.randint(3, VOCAB, (n,), generator=g)
    aux = torch.randn(n, 3 * H, generator=g)
    blocks = [5, 2, 9]
    # The pairs in two chunks through the paged cache: 6 rows, then 3 more.
    outs = []
    with torch.no_grad():
        for start, stop in [(0, 6), (6, 9)]:
            fb = build_forward_batch([(blocks, start, nxt[start:stop].tolist())], 4, torch.device("cpu"))
            backend.prepare(fb)
            outs.append(drafter(drafter.embed(fb.input_ids), drafter.fuse(aux[start:stop]),
                                fb.positions, drafter.paged(fb)))
        o = torch.cat(outs)
        ref_o, ref_logits = reference_eagle(w, embedding.weight, nxt, aux, torch.arange(n), fuse=True)
        torch.testing.assert_close(o, ref_o, atol=1e-4, rtol=1e-4)
        logits = drafter.target_logits(o)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        # Only draft-vocabulary tokens are possible, and they map through d2t.
        assert set(logits.argmax(-1).tolist()) <= set((3 + 5 * torch.arange(DRAFT_VOCAB)).tolist())
        small = drafter.compute_logits(o).argmax(-1)
        assert torch.equal(drafter.to_target_ids(small), logits.argmax(-1))

        # A chained draft step: the drafter's own o as the hidden (no fc), one row.
        d = torch.tensor([17])
        fb = build_forward_batch([(blocks, n, d.tolist())], 4, torch.device("cpu"))
        backend.prepare(fb)
        o2 = drafter(drafter.embed(fb.input_ids), o[-1:], fb.positions, drafter.paged(fb))
        # Reference: the same rows densely, the last fed its predecessor's o unfused.
        hidden = torch.cat([aux @ w["fc.weight"].T, ref_o[-1:]])
        ref2, _ = reference_eagle(w, embedding.weight, torch.cat([nxt, d]), hidden, torch.arange(n + 1),
                                  fuse=False)
        torch.testing.assert_close(o2, ref2[-1:], atol=1e-4, rtol=1e-4)


def test_name_variants_and_bad_checkpoints(tmp_path, embedding) -> None:
    w = _published_tensors(1)
    # speculators-style names: layers.0.* with a model. prefix.
    renamed = {("model.layers.0." + k[len("midlayer."):]) if k.startswith("midlayer.") else k: v
               for k, v in w.items()}
    a = load_eagle(_write_checkpoint(str(tmp_path / "a"), w), _target_config())
    b = load_eagle(_write_checkpoint(str(tmp_path / "b"), renamed), _target_config())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    missing = dict(w)
    del missing["midlayer.hidden_norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_eagle(_write_checkpoint(str(tmp_path / "c"), missing), _target_config())
    extra = dict(w, **{"midlayer.bogus.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match="bogus"):
        load_eagle(_write_checkpoint(str(tmp_path / "d"), extra), _target_config())
    other = _target_config()
    other.vocab_size = 300
    with pytest.raises(ValueError, match="vocabulary"):
        load_eagle(str(tmp_path / "a"), other)


def test_save_roundtrip_writes_the_published_layout(tmp_path, embedding) -> None:
    w = _published_tensors(2, parallel=True)
    src = load_eagle(_write_checkpoint(str(tmp_path / "src"), w, parallel=True), _target_config())
    save_eagle(src, str(tmp_path / "out"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("t2d"), w["t2d"])
    assert names == (set(w) - {"mask_hidden"}) | {"mask_hidden"}
    back = load_eagle(str(tmp_path / "out"), _target_config())
    assert back.config.parallel and back.config.parallel_positions == 4
    for (na, pa), (nb, pb) in zip(src.named_parameters(), back.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(src.d2t, back.d2t)
    # mask_hidden was stored before fc (3H): loaded as fc(mask_hidden).
    torch.testing.assert_close(src.mask_hidden, w["mask_hidden"] @ w["fc.weight"].T)


def test_draft_logq_is_the_target_vocabulary_log_q_in_draft_columns(tmp_path, embedding) -> None:
    """draft_logq: log q over the draft vocabulary equals the full-vocabulary log q at each
    column's target token (the missing tokens have q = 0), and the columns map to tokens as
    d2t says; a new d2t (load_weights) is picked up."""
    w = _published_tensors(3)
    d = load_eagle(_write_checkpoint(str(tmp_path / "d"), w), _target_config())
    o = torch.randn(5, d.config.hidden_size, generator=torch.Generator().manual_seed(0))
    logq, tokens = d.draft_logq(o)
    assert logq.shape == (5, d.config.draft_vocab_size)
    assert tokens.tolist() == d.to_target_ids(torch.arange(d.config.draft_vocab_size)).tolist()
    full = torch.log_softmax(d.target_logits(o), dim=-1)
    torch.testing.assert_close(logq, full[:, torch.from_numpy(tokens)])
    assert torch.isinf(full).sum() == 5 * (d.config.vocab_size - d.config.draft_vocab_size)
    d.load_weights(dict(w, d2t=torch.zeros_like(w["d2t"])))
    assert d.draft_logq(o)[1].tolist() == list(range(d.config.draft_vocab_size))


def test_parallel_mask_positions_in_one_forward_equal_one_at_a_time(tmp_path, embedding) -> None:
    """P-EAGLE: the k - 1 mask rows after a real prefix, in one forward (a chunk) or one
    row per forward (decodes), give the same outputs: the same inputs, the same mask."""
    w = _published_tensors(4, parallel=True)
    backend = TorchAttentionBackend()
    drafter = load_eagle(_write_checkpoint(str(tmp_path / "p"), w, parallel=True), _target_config(), backend)
    drafter.share_embedding(embedding)
    _bind_cache(drafter)
    g = torch.Generator().manual_seed(5)
    n, k = 7, 4
    nxt = torch.randint(3, VOCAB, (n,), generator=g)
    aux = torch.randn(n, 3 * H, generator=g)
    blocks = [1, 3, 4, 6]
    cpu = torch.device("cpu")

    def run(seqs, embeds, hidden):
        fb = build_forward_batch(seqs, 4, cpu)
        backend.prepare(fb)
        return drafter(embeds, hidden, fb.positions, drafter.paged(fb))

    with torch.no_grad():
        run([(blocks, 0, nxt.tolist())], drafter.embed(nxt), drafter.fuse(aux))
        masks_e = drafter.mask_embed.expand(k - 1, H)
        masks_h = drafter.mask_hidden.expand(k - 1, H)
        together = run([(blocks, n, [0] * (k - 1))], masks_e, masks_h)
        one = torch.cat([run([(blocks, n + j, [0])], masks_e[:1], masks_h[:1]) for j in range(k - 1)])
    torch.testing.assert_close(together, one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])   # the positions differ


def test_deeper_drafter_layout_reference_and_roundtrip(tmp_path, embedding) -> None:
    """A two-layer drafter in the published naming (`model.layers.0` = midlayer,
    `model.layers.1` a plain Llama layer): its paged forward in two chunks equals layer 0's
    reference followed by a dense Llama layer, and save_eagle writes `layers.1.*` back."""
    w = _published_tensors(4)
    g = torch.Generator().manual_seed(9)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.15
    deep = {"self_attn.q_proj.weight": r(HEADS * D, H), "self_attn.k_proj.weight": r(KV_HEADS * D, H),
            "self_attn.v_proj.weight": r(KV_HEADS * D, H), "self_attn.o_proj.weight": r(H, HEADS * D),
            "mlp.gate_proj.weight": r(INTER, H), "mlp.up_proj.weight": r(INTER, H),
            "mlp.down_proj.weight": r(H, INTER), "input_layernorm.weight": 1 + r(H),
            "post_attention_layernorm.weight": 1 + r(H)}
    w.update({f"layers.1.{k}": v for k, v in deep.items()})
    published = {("model.layers.0." + k[len("midlayer."):]) if k.startswith("midlayer.")
                 else ("model." + k) if k.startswith("layers.") else k: v for k, v in w.items()}
    backend = TorchAttentionBackend()
    drafter = load_eagle(_write_checkpoint(str(tmp_path / "deep"), published, layers=2), _target_config(), backend)
    assert len(drafter.attention_layers()) == 2 and drafter.config.layer.num_hidden_layers == 2
    drafter.share_embedding(embedding)
    _bind_cache(drafter)
    n = 7
    nxt = torch.randint(3, VOCAB, (n,), generator=g)
    aux = torch.randn(n, 3 * H, generator=g)
    outs = []
    with torch.no_grad():
        for start, stop in [(0, 4), (4, 7)]:
            fb = build_forward_batch([([3, 8], start, nxt[start:stop].tolist())], 4, torch.device("cpu"))
            backend.prepare(fb)
            outs.append(drafter(drafter.embed(fb.input_ids), drafter.fuse(aux[start:stop]), fb.positions,
                                drafter.paged(fb)))
        o0, _ = reference_eagle(w, embedding.weight, nxt, aux, torch.arange(n), fuse=True)
        ref = reference_deep_layer(w, "layers.1", o0, torch.arange(n))
        torch.testing.assert_close(torch.cat(outs), ref, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="2 layers"):   # one attention for two layers
            drafter(drafter.embed(fb.input_ids), drafter.fuse(aux[4:]), fb.positions, drafter.paged(fb)[:1])
    save_eagle(drafter, str(tmp_path / "out"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f"layers.1.{k}" for k in deep} <= set(f.keys())
    back = load_eagle(str(tmp_path / "out"), _target_config())
    for (na, pa), (nb, pb) in zip(drafter.named_parameters(), back.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
