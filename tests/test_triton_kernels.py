"""The Triton attention kernels against their torch references at tiny shapes: on the CPU
through Triton's interpreter (TRITON_INTERPRET=1), on a GPU compiled. bench/kernels_gpu.py
runs the same checks at real shapes on a GPU.

Triton decides at import and decoration time whether to interpret, so on a machine without
CUDA this module sets TRITON_INTERPRET before triton is first imported. It stays set for the
session: there nothing but the interpreter can run a Triton kernel anyway.
"""
from __future__ import annotations

import json

import pytest
import torch

from _triton_interpret import DEVICE  # noqa: F401  (sets TRITON_INTERPRET on the CPU first)

from ember.attention import triton_backend as backend_mod  # noqa: E402
from ember.attention import triton_decode as decode_mod  # noqa: E402
from ember.attention import triton_kv_write as kv_write_mod  # noqa: E402
from ember.attention import triton_prefill as prefill_mod  # noqa: E402
from ember.attention.torch_ref import (TorchAttentionBackend, paged_attention_ref,  # noqa: E402
                                       write_kv)
from ember.engine.forward_batch import ForwardBatch  # noqa: E402


# The interpreter's scalar conversions trip a numpy deprecation warning thousands of times.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite or unwritten (NaN-poisoned) output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Batch:
    """A random paged batch: sequence i has ctx[i] cached tokens and q_len[i] new ones
    (decodes, q_len == 1, first), its blocks scattered over a shuffled pool."""

    def __init__(self, ctx: list[int], q_len: list[int], heads: int, kv_heads: int, d: int,
                 block_size: int, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ctx, self.q_len = ctx, q_len
        self.seq_lens = [c + n for c, n in zip(ctx, q_len)]
        self.num_decodes = next((i for i, n in enumerate(q_len) if n != 1), len(q_len))
        self.qsl = [0]
        for n in q_len:
            self.qsl.append(self.qsl[-1] + n)
        self.block_size = block_size
        nblocks = [-(-s // block_size) for s in self.seq_lens]
        pool = sum(nblocks) + 3
        perm = torch.randperm(pool, generator=g)
        self.block_tables = torch.zeros((len(ctx), max(nblocks) + 1), dtype=torch.int32)
        used = 0
        for i, nb in enumerate(nblocks):
            self.block_tables[i, :nb] = perm[used:used + nb].int()
            used += nb
        # Random data everywhere: the cached prefix, and stale values in unused slots.
        self.kv_cache = torch.randn((2, pool, block_size, kv_heads, d), generator=g).to(dtype)
        t = self.qsl[-1]
        # q, k, v as strided views of one fused projection, as the model produces them.
        qkv = torch.randn((t, heads + 2 * kv_heads, d), generator=g).to(dtype)
        self.q = qkv[:, :heads]
        self.k = qkv[:, heads:heads + kv_heads]
        self.v = qkv[:, heads + kv_heads:]
        slots = []
        for i in range(len(ctx)):
            pos = torch.arange(ctx[i], self.seq_lens[i])
            blocks = self.block_tables[i].long()[pos // block_size]
            slots.append(blocks * block_size + pos % block_size)
        self.slot_mapping = torch.cat(slots)
        for name in ("block_tables", "kv_cache", "q", "k", "v", "slot_mapping"):
            setattr(self, name, getattr(self, name).to(DEVICE))
        self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32, device=DEVICE)

    def filled_cache(self) -> torch.Tensor:
        cache = self.kv_cache.clone()
        write_kv(cache, self.k, self.v, self.slot_mapping)
        return cache

    def forward_batch(self) -> ForwardBatch:
        t = self.qsl[-1]
        return ForwardBatch(
            input_ids=torch.zeros(t, dtype=torch.long, device=DEVICE),
            positions=torch.cat([torch.arange(c, s) for c, s in zip(self.ctx, self.seq_lens)]).to(DEVICE),
            slot_mapping=self.slot_mapping, query_start_loc=self.qsl,
            seq_lens=torch.tensor(self.seq_lens, device=DEVICE), seq_lens_list=self.seq_lens,
            block_tables=self.block_tables, num_decodes=self.num_decodes,
            logits_indices=torch.tensor(self.qsl[1:], device=DEVICE) - 1, block_size=self.block_size)


# ---- KV write ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,d", [(2, 32), (1, 16), (3, 24)])
def test_kv_write_matches_reference(dtype, kv_heads, d):
    b = Batch([0, 5, 3], [9, 12, 1], heads=kv_heads, kv_heads=kv_heads, d=d, block_size=4,
              dtype=dtype, seed=1)
    expected = b.filled_cache()
    got = b.kv_cache.clone()
    kv_write_mod.write_kv_triton(got, b.k, b.v, b.slot_mapping)
    assert torch.equal(got, expected)


def test_kv_write_skips_negative_slots():
    b = Batch([0], [10], heads=2, kv_heads=2, d=16, block_size=4, dtype=torch.float32, seed=2)
    slots = b.slot_mapping.clone()
    slots[3] = -1  # a padded token
    expected = b.kv_cache.clone()
    keep = slots >= 0
    write_kv(expected, b.k[keep], b.v[keep], slots[keep])
    got = b.kv_cache.clone()
    kv_write_mod.write_kv_triton(got, b.k, b.v, slots)
    assert torch.equal(got, expected)


# ---- decode -----------------------------------------------------------------------------
# Lengths at and across block (4) and tile (16) boundaries, from a single token up.
DECODE_LENS = [1, 4, 5, 16, 17, 70]


GQA = [(2, 2), (4, 1), (8, 1)]  # (heads, kv_heads): ratios 1, 4, 8


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(heads, kv_heads, dtype):
    b = Batch([n - 1 for n in DECODE_LENS], [1] * len(DECODE_LENS), heads, kv_heads, d=32,
              block_size=4, dtype=dtype, seed=3)
    cache = b.filled_cache()
    ref = paged_attention_ref(b.q, cache, b.block_tables, b.seq_lens, b.qsl, scale=0.2)
    seq_lens = b.seq_lens_t
    # 1 split (direct write), several, and more splits than tiles (empty splits).
    for splits in (1, 3, 8):
        out = torch.full_like(b.q, float("nan"))
        decode_mod.decode_attention(b.q, cache, b.block_tables, seq_lens, 0.2, splits, out=out,
                                    block_n=16)
        assert rel_err(out, ref) < TOL[dtype], f"splits={splits}"


def test_decode_fp16_head_dim_not_power_of_two():
    b = Batch([40, 2, 9], [1, 1, 1], heads=4, kv_heads=2, d=24, block_size=8,
              dtype=torch.float16, seed=4)
    cache = b.filled_cache()
    ref = paged_attention_ref(b.q, cache, b.block_tables, b.seq_lens, b.qsl, scale=24 ** -0.5)
    out = decode_mod.decode_attention(b.q, cache, b.block_tables, b.seq_lens_t, 24 ** -0.5, 2,
                                      block_n=16)
    assert rel_err(out, ref) < TOL[torch.float16]


def test_choose_num_splits():
    # Batch 1 at 32k with 8 kv heads must fill a 132-SM GPU; batch 64 needs few splits.
    assert 8 * decode_mod.choose_num_splits(1, 8, 32768, 132) >= 132
    assert decode_mod.choose_num_splits(64, 8, 32768, 132) <= 4
    # Short contexts are not split into slivers.
    assert decode_mod.choose_num_splits(1, 8, 200, 132) == 1
    assert decode_mod.choose_num_splits(1, 1, 1024, 132) <= 1024 // 256


# ---- prefill ----------------------------------------------------------------------------
# (cached prefix, new chunk): no prefix over several tiles; a prefix ending on a block
# boundary and a tile; one ending mid-block with a chunk crossing blocks and tiles; an exact tile;
# a short chunk after a prefix one past a tile. Two decodes in front must be left alone.
PREFILL_CTX = [6, 0, 0, 16, 13, 0, 33]
PREFILL_QLEN = [1, 1, 37, 16, 20, 16, 3]


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_reference(heads, kv_heads, dtype):
    b = Batch(PREFILL_CTX, PREFILL_QLEN, heads, kv_heads, d=32, block_size=4, dtype=dtype, seed=5)
    cache = b.filled_cache()
    ref = paged_attention_ref(b.q, cache, b.block_tables, b.seq_lens, b.qsl, scale=0.2)
    nd = b.num_decodes
    # Prefix tiles: whole tiles plus a tail (33), a tail only (13), whole tiles only (16).
    for block_m, block_n, block_np in ((16, 16, 16), (32, 16, 32)):
        tiles = torch.from_numpy(prefill_mod.build_prefill_tiles(b.qsl, nd, b.seq_lens, block_m)).to(DEVICE)
        out = torch.full_like(b.q, float("nan"))
        prefill_mod.prefill_attention(b.q, b.k, b.v, cache, b.block_tables, b.seq_lens_t, tiles,
                                      0.2, out, block_m, block_n, block_n_prefix=block_np)
        assert torch.isnan(out[:nd]).all(), "prefill wrote decode rows"
        assert rel_err(out[nd:], ref[nd:]) < TOL[dtype], f"tiles {block_m}x{block_n}/{block_np}"


def test_prefill_reads_prefix_from_cache_not_from_new_kv():
    # Changing a cached prefix token must change the result (the kernel reads the cache).
    b = Batch([0, 12], [1, 5], heads=2, kv_heads=1, d=16, block_size=4, dtype=torch.float32, seed=6)
    cache = b.filled_cache()
    tiles = torch.from_numpy(prefill_mod.build_prefill_tiles(b.qsl, 1, b.seq_lens, 16)).to(DEVICE)
    seq_lens = b.seq_lens_t
    out1 = prefill_mod.prefill_attention(b.q, b.k, b.v, cache, b.block_tables, seq_lens, tiles,
                                         0.3, torch.zeros_like(b.q), 16, 16)
    blk = b.block_tables[1, 1].item()
    cache[:, blk] += 1.0  # prefix positions 4..7
    out2 = prefill_mod.prefill_attention(b.q, b.k, b.v, cache, b.block_tables, seq_lens, tiles,
                                         0.3, torch.zeros_like(b.q), 16, 16)
    ref2 = paged_attention_ref(b.q, cache, b.block_tables, b.seq_lens, b.qsl, 0.3)
    assert not torch.allclose(out1[1:], out2[1:])
    assert rel_err(out2[1:], ref2[1:]) < 1e-5


def test_build_prefill_tiles_cover_each_query_once():
    qsl, seq_lens = [0, 1, 2, 40, 56, 59], [7, 1, 38, 24, 32]
    tiles = prefill_mod.build_prefill_tiles(qsl, 2, seq_lens, 16)
    rows = sorted(int(r) for seq, first, n, off in tiles for r in range(first + off, first + min(off + 16, n)))
    assert rows == list(range(2, 59))
    work = [seq_lens[s] - n + off for s, _, n, off in tiles]
    assert work == sorted(work, reverse=True)  # heaviest first


# ---- backend ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_mixed_step_matches_torch_backend(dtype):
    """Decodes and prefill chunks (with and without a cached prefix) in one step."""
    b = Batch([9, 3, 0, 0, 5, 21], [1, 1, 1, 19, 34, 8], heads=4, kv_heads=2, d=32,
              block_size=4, dtype=dtype, seed=7)
    results = []
    for backend in (TorchAttentionBackend(), backend_mod.TritonAttentionBackend()):
        fb = b.forward_batch()
        cache = b.kv_cache.clone()
        backend.prepare(fb)
        results.append((backend.forward(b.q, b.k, b.v, cache, fb, 32 ** -0.5), cache))
    (ref_out, ref_cache), (out, cache) = results
    assert torch.equal(cache, ref_cache)
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_kernel_matches_reference(dtype):
    """Tree rows with a mask over more slots than rows (a drafter's level) and over exactly
    its rows (verification), next to a plain sequence the kernel must leave alone."""
    from ember.attention.triton_tree import build_tree_tiles, tree_attention
    from ember.spec.tree import ancestor_mask, tree_attention_ref
    b = Batch([13, 40, 6], [5, 1, 37], heads=4, kv_heads=2, d=24, block_size=4, dtype=dtype, seed=9)
    full = ancestor_mask([-1, -1, 0, 0, 1, 2, 2, 4, 5, 5, 3, -1, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                          20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35])   # 37 rows
    masks = [full[6:11, :11].to(DEVICE), None, full.to(DEVICE)]   # rows 6..10 of an 11-slot tail
    cache = b.filled_cache()
    host, flat = build_tree_tiles(b.qsl, masks, 16)
    assert host.shape[0] == 1 + 3   # 5 rows: one tile; 37 rows: three
    out = torch.full_like(b.q, float("nan"))
    tree_attention(b.q, cache, b.block_tables, b.seq_lens_t, torch.from_numpy(host).to(DEVICE),
                   flat.to(DEVICE), 0.3, out, block_m=16, block_n=16)
    for i in (0, 2):
        a, e = b.qsl[i], b.qsl[i + 1]
        ref = tree_attention_ref(b.q[a:e], cache, b.block_tables[i], b.seq_lens[i], masks[i], 0.3)
        assert rel_err(out[a:e], ref) < TOL[dtype], i
    assert torch.isnan(out[b.qsl[1]:b.qsl[2]]).all()   # the plain sequence is untouched


def test_backend_tree_sequences_match_torch_backend():
    """A step with tree sequences (fb.attn_masks, tree verification) beside decodes and a
    causal chunk: the tree rows take the masked path, the rest the kernels."""
    from ember.spec.tree import ancestor_mask, with_root_row
    b = Batch([9, 3, 5, 21], [1, 9, 7, 8], heads=4, kv_heads=2, d=32, block_size=4,
              dtype=torch.float32, seed=3)
    tree = with_root_row(ancestor_mask([-1, -1, 0, 0, 1, 2, 2, 4])).to(DEVICE)   # 9 rows
    results = []
    for backend in (TorchAttentionBackend(), backend_mod.TritonAttentionBackend()):
        fb = b.forward_batch()
        fb.attn_masks = [None, tree, None, tree[1:, 1:]]   # the last: a tree over 8 slots, no root row
        cache = b.kv_cache.clone()
        backend.prepare(fb)
        results.append((backend.forward(b.q, b.k, b.v, cache, fb, 32 ** -0.5), cache))
    (ref_out, ref_cache), (out, cache) = results
    assert torch.equal(cache, ref_cache)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    # The tree rows really differ from causal attention.
    fb = b.forward_batch()
    causal = TorchAttentionBackend()
    causal.prepare(fb)
    plain = causal.forward(b.q, b.k, b.v, b.kv_cache.clone(), fb, 32 ** -0.5)
    assert rel_err(out[1:10], plain[1:10]) > 1e-2


def test_backend_decode_reads_static_inputs_in_place():
    """What CUDA-graph replay relies on: after prepare(), the forward reads seq_lens, block
    tables and slots from the batch's own int32/int64 tensors, so new values copied into them
    take effect without another prepare(); a padded row (slot -1) writes nothing."""
    b = Batch([30, 12, 7], [1, 1, 1], heads=4, kv_heads=1, d=16, block_size=4,
              dtype=torch.float32, seed=8)
    fb = b.forward_batch()
    fb.seq_lens = fb.seq_lens.to(torch.int32)
    backend = backend_mod.TritonAttentionBackend()
    backend.prepare(fb)
    # The next step, written in place: sequence 0 one token longer, 1 shorter, 2 padding.
    new_lens = [32, 10, 1]
    fb.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    pos = torch.tensor([31, 9], device=DEVICE)
    blocks = b.block_tables[:2].long()[torch.arange(2, device=DEVICE), pos // 4]
    fb.slot_mapping[:2].copy_(blocks * 4 + pos % 4)
    fb.slot_mapping[2] = -1
    cache = b.kv_cache.clone()
    out = backend.forward(b.q, b.k, b.v, cache, fb, 0.25)
    expected_cache = b.kv_cache.clone()
    write_kv(expected_cache, b.k[:2], b.v[:2], fb.slot_mapping[:2])
    assert torch.equal(cache, expected_cache)
    ref = paged_attention_ref(b.q[:2], expected_cache, b.block_tables[:2], new_lens[:2], [0, 1, 2], 0.25)
    assert rel_err(out[:2], ref) < TOL[torch.float32]


def test_registry_returns_triton_backend():
    from ember.attention.backend import get_attention_backend
    assert get_attention_backend("triton").name == "triton"


# ---- end to end -------------------------------------------------------------------------
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "eos_token_id": 2,
}


def _greedy_tokens(config_path: str, backend: str, layer_kernels: str = "torch") -> list[list[int]]:
    from ember import LLM
    from ember.sampling_params import SamplingParams
    llm = LLM(config_path, load_format="dummy", attention_backend=backend, device=DEVICE,
              layer_kernels=layer_kernels,
              dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=4,
              max_model_len=128, max_num_batched_tokens=16)
    with torch.no_grad():
        # Larger weights than the dummy default: well-separated logits, so greedy choices
        # don't hinge on rounding.
        for p in llm.engine.runner.model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 128, (n,), generator=g).tolist()}
               for n in (5, 23, 38)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_engine_greedy_tokens_match_torch_backend(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    # Token budget 16 splits the longer prompts into chunks over cached prefixes.
    expected = _greedy_tokens(str(path), "torch")
    got = _greedy_tokens(str(path), "triton")
    assert [len(t) for t in got] == [6, 6, 6]
    assert got == expected


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_engine_greedy_tokens_match_with_fused_layer_kernels(tmp_path, arch):
    """The fused norm / RoPE (+ Qwen3 q/k norm) / SiLU-mul kernels with the Triton attention
    give the all-torch greedy tokens."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(TINY_LLAMA, architectures=[arch], num_key_value_heads=2)))
    expected = _greedy_tokens(str(path), "torch", "torch")
    got = _greedy_tokens(str(path), "triton", "triton")
    assert [len(t) for t in got] == [6, 6, 6]
    assert got == expected
