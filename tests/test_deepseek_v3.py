"""DeepSeek-V3 (MLA over the latent KV cache) against transformers' DeepseekV3ForCausalLM:
logits at fp32 tolerance and identical greedy tokens on tiny random checkpoints written by
`save_pretrained`; absorbed attention equal to expanded; the prefix cache and chunked
prefill unchanged in output; MTP tensors skipped; dummy weights; the model-chosen layout."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import assert_no_leaks, random_prompts
from test_model_parity import CHUNKINGS, ember_logits, hf_greedy

from ember import LLM, SamplingParams
from ember.attention.mla_backend import MLADims, get_mla_backend
from ember.engine.forward_batch import ForwardBatch

BLOCK_SIZE = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 1.0}

# rms_norm_eps differs from the 1e-6 transformers gives the latent norms; v_head_dim from
# qk_nope_head_dim; both catch mixed-up dimensions or epsilons.
_BASE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=24,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=8,
    n_shared_experts=1, n_group=1, topk_group=1, num_experts_per_tok=2,
    first_k_dense_replace=2, max_position_embeddings=256, initializer_range=0.1,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES: dict[str, dict[str, Any]] = {
    "qlora-2dense": {},
    "noqlora-1dense": dict(q_lora_rank=None, num_hidden_layers=1, first_k_dense_replace=1),
    "yarn": dict(rope_parameters=YARN),
    "yarn-noninterleaved": dict(rope_parameters=YARN, rope_interleave=False, q_lora_rank=None,
                                num_hidden_layers=3, first_k_dense_replace=3),
    # MoE from layer first_k_dense_replace on; e_score_correction_bias is randomized.
    "moe-8e-2groups": dict(first_k_dense_replace=1, n_group=2, topk_group=1),
    "moe-16e-4groups-yarn": dict(q_lora_rank=None, n_routed_experts=16, n_group=4, topk_group=2,
                                 num_experts_per_tok=3, n_shared_experts=2, num_hidden_layers=3,
                                 first_k_dense_replace=1, rope_parameters=YARN),
    "moe-4e-all-layers": dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=0,
                              norm_topk_prob=False, routed_scaling_factor=1.5),
}


@dataclass
class Ckpt:
    path: str
    hf_model: Any


_built: dict[str, Ckpt] = {}


def build_ckpt(name: str, root, **extra: Any) -> Ckpt:
    """A tiny random transformers DeepseekV3ForCausalLM (case `name`, with `extra` config
    fields on top), saved with save_pretrained."""
    key = name + "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
    if key in _built:
        return _built[key]
    from transformers import AutoModelForCausalLM, DeepseekV3Config
    config = DeepseekV3Config(**{**_BASE, **CASES.get(name, {}), **extra})
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for m in model.modules():   # transformers starts it at zero: make it steer selection
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn(m.e_score_correction_bias.shape) * 0.1)
    path = str(root / key)
    model.save_pretrained(path, safe_serialization=True)
    _split_fused_experts(os.path.join(path, "model.safetensors"))
    _built[key] = Ckpt(path, model)
    return _built[key]


def _split_fused_experts(file: str) -> None:
    """Released DeepSeek checkpoints store experts one by one (`experts.{e}.gate_proj.weight`);
    transformers 5 fuses them in memory and writes them back split (5.24 does). Should a
    version write the fused form, split it here so the tests load what real checkpoints hold."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(file)
    fused = [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    for k in fused:
        t, prefix = tensors.pop(k), k.rsplit(".", 1)[0]
        for e in range(t.shape[0]):
            if k.endswith("gate_up_proj"):   # [E, 2I, H]: gate rows, then up rows
                gate, up = t[e].chunk(2)
                tensors[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                tensors[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:                            # [E, H, I]
                tensors[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
    if fused:
        save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is the parity oracle")
    return tmp_path_factory.mktemp("tiny_deepseek")


def make_llm(ckpt: Ckpt, **kw: Any) -> LLM:
    args = dict(num_kv_blocks=64, block_size=BLOCK_SIZE, dtype="float32")
    args.update(kw)
    return LLM(ckpt.path, **args)


@torch.inference_mode()
def hf_logits(ckpt: Ckpt, token_ids: list[int]) -> torch.Tensor:
    return ckpt.hf_model(torch.tensor([token_ids])).logits[0].float()


# ---- parity with transformers ---------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(root, case: str) -> None:
    ckpt = build_ckpt(case, root)
    llm = make_llm(ckpt)
    (prompt,) = random_prompts([100], seed=11)
    expected = hf_logits(ckpt, prompt)
    for chunks in CHUNKINGS.values():   # whole prefill; prefixes read back from the cache; decodes
        got = ember_logits(llm, prompt, chunks)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    prompts = random_prompts([3, 9, 17, 70], seed=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(ckpt.hf_model, p, GREEDY.max_tokens), \
            f"{case}: prompt of {len(p)} tokens diverged from transformers"
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_each_prefill_path_matches_transformers(root, mode: str) -> None:
    """Every chunk forced through one path (decodes stay absorbed)."""
    ckpt = build_ckpt("yarn", root)
    llm = make_llm(ckpt)
    llm.engine.runner.backend.prefill_mode = mode
    (prompt,) = random_prompts([60], seed=12)
    got = ember_logits(llm, prompt, [25, 1, 20, 14])
    torch.testing.assert_close(got, hf_logits(ckpt, prompt), atol=2e-4, rtol=1e-4)


def test_rope_options_really_differ(root) -> None:
    """The parity cases would not test interleaving or YaRN if transformers' outputs did not
    depend on them."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config
    (prompt,) = random_prompts([100], seed=11)
    base = hf_logits(build_ckpt("qlora-2dense", root), prompt)
    for kw in (dict(rope_interleave=False), dict(rope_parameters=YARN)):
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(DeepseekV3Config(**{**_BASE, **kw}),
                                                 dtype=torch.float32).eval()
        assert not torch.allclose(hf_logits(Ckpt("", model), prompt), base, atol=1e-2)


def test_yarn_tables_match_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ember.layers.rotary import compute_inv_freq, rope_attention_factor
    rope = dict(YARN, factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                mscale_all_dim=0.707)
    cfg = DeepseekV3Config(**{**_BASE, "qk_rope_head_dim": 64, "rope_parameters": rope,
                              "max_position_embeddings": 163840})
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    ours = compute_inv_freq(64, 10000.0, rope, 163840)
    assert torch.equal(ours, inv_freq)
    assert not torch.allclose(ours, compute_inv_freq(64, 10000.0, None))
    assert rope_attention_factor(rope, 163840) == pytest.approx(factor)


# ---- absorbed vs expanded attention ----------------------------------------------------
# Powers of two >= 16 for R and P: the Triton kernel's shapes (tests/test_mla_triton.py).
DIMS = MLADims(num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=12)


def _mla_batch(seq_lens: list[int], q_lens: list[int], num_decodes: int, seed: int = 0,
               device: str = "cpu"):
    """Random MLA inputs for sequences with seq_lens[i] keys, the last q_lens[i] of them new;
    their blocks scattered over a shuffled pool; the cache pre-filled with old rows."""
    g = torch.Generator().manual_seed(seed)
    d, bs = DIMS, 4
    nblocks = [-(-s // bs) for s in seq_lens]
    perm = torch.randperm(sum(nblocks) + 2, generator=g)
    tables = torch.zeros((len(seq_lens), max(nblocks)), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(nblocks):
        tables[i, :nb] = perm[used:used + nb].int()
        used += nb
    cache = torch.randn((len(perm), bs, d.kv_lora_rank + d.qk_rope_head_dim), generator=g)
    qsl, slots, pos = [0], [], []
    for i, (s, n) in enumerate(zip(seq_lens, q_lens)):
        qsl.append(qsl[-1] + n)
        for p in range(s - n, s):
            pos.append(p)
            slots.append(int(tables[i, p // bs]) * bs + p % bs)
    t = qsl[-1]
    fb = ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.long, device=device),
        positions=torch.tensor(pos, device=device), slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, device=device),
        seq_lens_list=list(seq_lens), block_tables=tables.to(device), num_decodes=num_decodes,
        logits_indices=torch.tensor([q - 1 for q in qsl[1:]], device=device), block_size=bs)
    h = d.num_heads
    inputs = dict(
        q_nope=torch.randn((t, h, d.qk_nope_head_dim), generator=g),
        q_pe=torch.randn((t, h, d.qk_rope_head_dim), generator=g),
        c_kv=torch.randn((t, d.kv_lora_rank), generator=g),
        k_pe=torch.randn((t, d.qk_rope_head_dim), generator=g),
        kv_b_weight=torch.randn((h * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank), generator=g) * 0.2)
    return fb, cache.to(device), {k: v.to(device) for k, v in inputs.items()}


def _run_mla(mode: str, fb: ForwardBatch, cache: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    backend = get_mla_backend("torch", None, DIMS, prefill_mode=mode)
    backend.prepare(fb)
    cache = cache.clone()
    out = backend.forward(**inputs, cache=cache, fb=fb, scale=0.3)
    return out, cache


def test_absorbed_attention_equals_expanded() -> None:
    """Two decodes, a chunk after a prefix, a fresh chunk: absorbed (the decode path, and
    chunks as per-token latent rows) against expanded (per-head K/V from the latent)."""
    seq_lens, q_lens = [9, 1, 23, 6], [1, 1, 5, 6]
    fb, cache, inputs = _mla_batch(seq_lens, q_lens, num_decodes=2)
    absorbed, cache_a = _run_mla("absorbed", fb, cache, inputs)
    # The same batch with the decodes as 1-token chunks, so they go the expanded way too.
    fb_e, _, _ = _mla_batch(seq_lens, q_lens, num_decodes=0)
    expanded, cache_e = _run_mla("expanded", fb_e, cache, inputs)
    assert torch.equal(cache_a, cache_e)   # same latent rows written
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)
    # And the plan really differed: all rows latent in one, none in the other.
    assert fb.attn_metadata.num_latent_rows == sum(q_lens) and not fb.attn_metadata.expanded
    assert fb_e.attn_metadata.num_latent_rows == 0 and len(fb_e.attn_metadata.expanded) == 4


def test_auto_prefill_rule_absorbs_small_chunks_over_long_prefixes() -> None:
    from ember.attention.mla_backend import prefers_absorbed
    v2_lite = MLADims(16, 512, 128, 64, 128)
    assert prefers_absorbed(1, 4096, v2_lite) and prefers_absorbed(8, 4096, v2_lite)
    assert not prefers_absorbed(512, 4096, v2_lite) and not prefers_absorbed(2048, 2048, v2_lite)
    fb, cache, inputs = _mla_batch([40, 12], [2, 12], num_decodes=0)
    auto, _ = _run_mla("auto", fb, cache, inputs)
    assert fb.attn_metadata.num_latent_rows == 2 and [e[0] for e in fb.attn_metadata.expanded] == [1]
    expanded, _ = _run_mla("expanded", fb, cache, inputs)
    torch.testing.assert_close(auto, expanded, atol=1e-5, rtol=1e-5)


# ---- the engine around it ----------------------------------------------------------------
def test_prefix_cache_and_chunked_prefill_keep_greedy_tokens(root) -> None:
    ckpt = build_ckpt("yarn", root)
    (prefix,) = random_prompts([29], seed=40)
    suffixes = random_prompts([2, 6, 11, 1, 3], seed=41)
    prompts = [prefix + s[1:] for s in suffixes] + [prefix[:13], prefix]
    def run(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    ref = run(make_llm(ckpt, prefix_cache="none", block_size=4, num_kv_blocks=128))
    for budget in (None, 7):
        llm = make_llm(ckpt, prefix_cache="radix", block_size=4, num_kv_blocks=128,
                       max_num_batched_tokens=budget)
        first = llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)[0]
        assert first.outputs[0].token_ids == ref[0]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        assert all(o.num_cached_tokens >= 28 for o, p in zip(outs, prompts) if len(p) > 29)
        assert_no_leaks(llm.engine)


def test_checkpoints_store_experts_one_by_one(root) -> None:
    """As released DeepSeek checkpoints do (transformers fuses them only in memory)."""
    from safetensors import safe_open
    ckpt = build_ckpt("moe-8e-2groups", root)
    with safe_open(os.path.join(ckpt.path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(8)
            for p in ("gate", "up", "down")} <= names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names


def test_cache_layout_is_the_latent_one(root) -> None:
    from ember.cache.kv_spec import LatentKVSpec, kv_bytes_per_token
    ckpt = build_ckpt("qlora-2dense", root)
    runner = make_llm(ckpt).engine.runner
    assert [tuple(c.shape) for c in runner.kv_caches] == [(64, BLOCK_SIZE, 32 + 8)] * 2
    layers = runner.model.attention_layers()
    assert all(isinstance(layer.kv_cache_spec(torch.float32), LatentKVSpec) for layer in layers)
    assert kv_bytes_per_token(layers, torch.bfloat16) == 2 * (32 + 8) * 2


def test_mtp_layer_tensors_are_skipped(root, tmp_path) -> None:
    """A V3 checkpoint carries its MTP layer as model.layers.{num_hidden_layers}.*: loading
    ignores it (same logits), and the documented helper names it."""
    from safetensors.torch import load_file, save_file

    from ember.models.deepseek_v3 import is_mtp_weight, mtp_weight_names
    ckpt = build_ckpt("qlora-2dense", root)
    tensors = load_file(os.path.join(ckpt.path, "model.safetensors"))
    mtp = {k.replace("model.layers.0.", "model.layers.2."): v.clone()
           for k, v in tensors.items() if k.startswith("model.layers.0.")}
    mtp["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    mtp["model.layers.2.shared_head.head.weight"] = torch.zeros(256, 64)
    folder = tmp_path / "with_mtp"
    folder.mkdir()
    save_file({**tensors, **mtp}, str(folder / "model.safetensors"))
    with open(os.path.join(ckpt.path, "config.json")) as f:
        cfg = json.load(f)
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f)
    assert sorted(mtp_weight_names(list(tensors) + list(mtp), 2)) == sorted(mtp)
    assert not is_mtp_weight("model.layers.1.mlp.gate_up_proj.weight", 2)
    (prompt,) = random_prompts([20], seed=3)
    got = ember_logits(LLM(str(folder), num_kv_blocks=16, block_size=BLOCK_SIZE, dtype="float32"),
                       prompt, [20])
    torch.testing.assert_close(got, hf_logits(ckpt, prompt), atol=2e-4, rtol=1e-4)


def test_dummy_weights_run(root, tmp_path) -> None:
    ckpt = build_ckpt("moe-16e-4groups-yarn", root)
    config = tmp_path / "config.json"
    with open(os.path.join(ckpt.path, "config.json")) as f, open(config, "w") as g:
        g.write(f.read())
    llm = LLM(str(config), load_format="dummy", num_kv_blocks=16, block_size=BLOCK_SIZE,
              dtype="float32")
    (prompt,) = random_prompts([10], seed=2)
    logits = ember_logits(llm, prompt, [9, 1])
    assert torch.isfinite(logits).all() and logits.std() > 0
    out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
