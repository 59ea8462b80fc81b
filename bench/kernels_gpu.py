"""Attention kernels on a GPU: correctness at real shapes, then timings against torch SDPA.

    PYTHONUNBUFFERED=1 python3 bench/kernels_gpu.py [--quick] [--sweep none|prefill|decode|all]
    TRITON_INTERPRET=1 python bench/kernels_gpu.py --cpu-dry-run   # plumbing check, no GPU

(a) Every Triton kernel (KV write, paged decode, paged prefill, the backend's mixed step)
    against its torch reference at Llama-3.1-8B (32 q / 8 kv heads, d=128) and Qwen3
    (16 / 8, d=128) shapes: ragged batches, 2k-16k prefill chunks over cached prefixes,
    4k and 32k decode contexts, batch 1 and 64. Relative error ||out - ref|| / ||ref||
    against an fp32 reference on the same bf16/fp16 inputs; outputs are NaN-poisoned first.
(b) Median times (triton.testing.do_bench, which clears L2 between runs; the lower of two
    medians) against SDPA:
    prefill vs the flash backend on contiguous q/k/v (TFLOP/s, causal FLOPs counted once);
    decode vs SDPA over contiguous K/V (TB/s of K/V read), eager and replayed from a CUDA
    graph (small decodes are launch-bound when eager). --sweep also times alternative
    tile configs and split counts.

Prints a table at the end; the full log goes to $OUT/kernels.txt when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from ember.attention import triton_backend as tb  # noqa: E402
from ember.attention.torch_ref import paged_attention_ref, write_kv  # noqa: E402
from ember.attention.triton_decode import choose_num_splits, decode_attention  # noqa: E402
from ember.attention.triton_kv_write import write_kv_triton  # noqa: E402
from ember.attention.triton_prefill import build_prefill_tiles, prefill_attention  # noqa: E402
from ember.engine.forward_batch import ForwardBatch  # noqa: E402

DEV = "cuda"
MODELS = {"llama3.1-8b": (32, 8, 128), "qwen3": (16, 8, 128)}
SCALE = 1  # --cpu-dry-run divides every length by this


def L(n: int) -> int:
    return max(2, n // SCALE)


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}
FAILURES: list[str] = []
RESULTS: list[dict] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    if os.environ.get("OUT"):  # line by line, so a run cut off at its time limit still leaves its log
        with open(os.path.join(os.environ["OUT"], "kernels.txt"), "a") as f:
            f.write(msg + "\n")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(name: str, err: float, tol: float) -> None:
    ok = err < tol
    log(f"  [{'ok' if ok else 'FAIL'}] {name}: rel err {err:.2e} (tol {tol:.0e})")
    if not ok:
        FAILURES.append(f"{name}: {err:.2e}")


class PagedBatch:
    """Sequences with (ctx cached, q_len new) tokens in a paged cache, blocks shuffled."""

    def __init__(self, ctx: list[int], q_len: list[int], heads: int, kv_heads: int, d: int,
                 dtype: torch.dtype, block_size: int = 16, seed: int = 0,
                 fill_new: bool = True) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.ctx, self.q_len, self.block_size = ctx, q_len, block_size
        self.seq_lens = [c + n for c, n in zip(ctx, q_len)]
        self.num_decodes = next((i for i, n in enumerate(q_len) if n != 1), len(q_len))
        self.qsl = [0]
        for n in q_len:
            self.qsl.append(self.qsl[-1] + n)
        nblocks = [-(-s // block_size) for s in self.seq_lens]
        pool = sum(nblocks) + 1
        perm = torch.randperm(pool, device=DEV, generator=g).int()
        self.block_tables = torch.zeros((len(ctx), max(nblocks)), dtype=torch.int32, device=DEV)
        starts = [0]
        for nb in nblocks:
            starts.append(starts[-1] + nb)
        for i, nb in enumerate(nblocks):
            self.block_tables[i, :nb] = perm[starts[i]:starts[i + 1]]
        self.kv_cache = torch.randn((2, pool, block_size, kv_heads, d), device=DEV, generator=g,
                                    dtype=dtype)
        t = self.qsl[-1]
        qkv = torch.randn((t, heads + 2 * kv_heads, d), device=DEV, generator=g, dtype=dtype)
        self.q, self.k, self.v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        pos = torch.cat([torch.arange(c, s, device=DEV) for c, s in zip(ctx, self.seq_lens)])
        seq_of = torch.repeat_interleave(torch.arange(len(ctx), device=DEV),
                                         torch.tensor(q_len, device=DEV))
        blocks = self.block_tables[seq_of, pos // block_size].long()
        self.slot_mapping = blocks * block_size + pos % block_size
        self.positions = pos
        self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32, device=DEV)
        if fill_new:
            write_kv(self.kv_cache, self.k, self.v, self.slot_mapping)

    def forward_batch(self) -> ForwardBatch:
        return ForwardBatch(
            input_ids=torch.zeros(self.qsl[-1], dtype=torch.long, device=DEV),
            positions=self.positions, slot_mapping=self.slot_mapping, query_start_loc=self.qsl,
            seq_lens=torch.tensor(self.seq_lens, device=DEV), seq_lens_list=self.seq_lens,
            block_tables=self.block_tables, num_decodes=self.num_decodes,
            logits_indices=torch.tensor(self.qsl[1:], device=DEV) - 1, block_size=self.block_size)


# ---- (a) correctness ----------------------------------------------------------------------
def correctness(quick: bool) -> None:
    log("== correctness at real shapes (fp32 reference on the same inputs) ==")
    torch.manual_seed(0)
    for model, (h, kvh, d) in MODELS.items():
        # KV write: bit-exact against index_copy_.
        b = PagedBatch([0, L(5000), 77], [L(4096), L(1000), 1], h, kvh, d, torch.bfloat16, fill_new=False)
        ref = b.kv_cache.clone()
        write_kv(ref, b.k, b.v, b.slot_mapping)
        got = b.kv_cache.clone()
        write_kv_triton(got, b.k, b.v, b.slot_mapping)
        check(f"{model} kv_write {b.qsl[-1]} tokens", 0.0 if torch.equal(got, ref) else 1.0, 1e-9)

        # Decode: ragged contexts around 4k and 32k, batch 1 and 64.
        cases = [(1, 4096), (1, 32768), (64, 4096), (64, 32768)]
        if quick:
            cases = [(1, 32768), (64, 4096)]
        for bs, ctx in cases:
            ctx = L(ctx)
            g = torch.Generator().manual_seed(bs + ctx)
            lens = [ctx] if bs == 1 else torch.randint(ctx // 2, ctx + 1, (bs,), generator=g).tolist()
            b = PagedBatch([n - 1 for n in lens], [1] * bs, h, kvh, d, torch.bfloat16, seed=bs)
            ref = paged_attention_ref(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.qsl, d ** -0.5)
            auto = choose_num_splits(bs, kvh, max(lens), num_sms())
            for splits in sorted({1, auto, 7}):
                out = torch.full_like(b.q, float("nan"))
                decode_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens_t, d ** -0.5, splits,
                                 out=out, block_n=tb.CUDA_CONFIG.decode_block_n,
                                 num_warps=tb.CUDA_CONFIG.decode_warps,
                                 num_stages=tb.CUDA_CONFIG.decode_stages)
                check(f"{model} decode bs={bs} ctx~{ctx} splits={splits}", rel_err(out, ref), TOL[torch.bfloat16])
            del b, ref

        if DEV == "cuda":
            graph_replay_check(model, h, kvh, d)

        # Prefill: ragged chunks with and without cached prefixes, plus decodes in front.
        batches = {
            "ragged 2k-5k + prefixes": ([300, 4000, 0, 0, 1500, 8192], [1, 1, 2048, 777, 3001, 4096]),
            "16k from scratch": ([0], [16384]),
            "2k chunk after 14k prefix": ([14336], [2048]),
        }
        if quick:
            batches.pop("16k from scratch")
        for dtype in (torch.bfloat16, torch.float16):
            for name, (ctx, ql) in batches.items():
                ctx, ql = [L(c) if c else 0 for c in ctx], [L(n) if n > 1 else 1 for n in ql]
                if dtype == torch.float16 and name != "ragged 2k-5k + prefixes":
                    continue
                b = PagedBatch(ctx, ql, h, kvh, d, dtype, seed=len(ctx))
                ref = paged_attention_ref(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.qsl, d ** -0.5)
                nd = b.num_decodes
                cfg = tb.CUDA_CONFIG
                tiles = torch.from_numpy(build_prefill_tiles(b.qsl, nd, b.seq_lens, cfg.prefill_block_m)).to(DEV)
                out = torch.full_like(b.q, float("nan"))
                prefill_attention(b.q, b.k, b.v, b.kv_cache, b.block_tables, b.seq_lens_t, tiles,
                                  d ** -0.5, out, cfg.prefill_block_m, cfg.prefill_block_n,
                                  cfg.prefill_warps, cfg.prefill_stages, cfg.prefill_prefix_block_n)
                untouched = bool(torch.isnan(out[:nd]).all())
                check(f"{model} prefill {name} {str(dtype)[6:]}", rel_err(out[nd:], ref[nd:]), TOL[dtype])
                check(f"{model} prefill leaves decode rows alone", 0.0 if untouched else 1.0, 1e-9)
                # The whole backend step: write + decode + prefill in one forward.
                if dtype == torch.bfloat16 and nd:
                    b2 = PagedBatch(ctx, ql, h, kvh, d, dtype, seed=len(ctx), fill_new=False)
                    backend = tb.TritonAttentionBackend()
                    fb = b2.forward_batch()
                    backend.prepare(fb)
                    out = backend.forward(b2.q, b2.k, b2.v, b2.kv_cache, fb, d ** -0.5)
                    check(f"{model} backend mixed step ({name})", rel_err(out, ref), TOL[dtype])
                    del b2
                del b, ref
        torch.cuda.empty_cache()


def graph_replay_check(model: str, h: int, kvh: int, d: int) -> None:
    """Capture the backend's decode forward in a CUDA graph, then replay it on new lengths,
    slots and block tables copied into the captured tensors (as the engine's graph runner does)."""
    bs, ctx = 16, L(4096)
    b = PagedBatch([ctx - 1] * bs, [1] * bs, h, kvh, d, torch.bfloat16, seed=11, fill_new=False)
    fb = b.forward_batch()
    fb.seq_lens = fb.seq_lens.to(torch.int32)
    backend = tb.TritonAttentionBackend()
    backend.prepare(fb)
    q, k, v = b.q.clone(), b.k.clone(), b.v.clone()
    cache = b.kv_cache.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(q, k, v, cache, fb, d ** -0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, fb, d ** -0.5)
    # A new step: ragged shorter lengths, shuffled tables, fresh q/k/v.
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, ctx + 1, (bs,), generator=g).tolist()
    b2 = PagedBatch([n - 1 for n in lens], [1] * bs, h, kvh, d, torch.bfloat16, seed=12, fill_new=False)
    pool = b2.kv_cache.shape[1]  # <= the captured pool: these contexts are no longer
    cache[:, :pool].copy_(b2.kv_cache[:, :pool])
    fb.seq_lens.copy_(b2.seq_lens_t)
    fb.block_tables.zero_()
    fb.block_tables[:, :b2.block_tables.shape[1]].copy_(b2.block_tables)
    fb.slot_mapping.copy_(b2.slot_mapping)
    q.copy_(b2.q), k.copy_(b2.k), v.copy_(b2.v)
    expected = cache.clone()
    write_kv(expected, b2.k, b2.v, b2.slot_mapping)
    graph.replay()
    torch.cuda.synchronize()
    check(f"{model} decode CUDA-graph replay writes K/V", 0.0 if torch.equal(cache, expected) else 1.0, 1e-9)
    ref = paged_attention_ref(b2.q, expected, b2.block_tables, b2.seq_lens, b2.qsl, d ** -0.5)
    check(f"{model} decode CUDA-graph replay on new lengths", rel_err(out, ref), TOL[torch.bfloat16])


# ---- (b) timings --------------------------------------------------------------------------
def bench(fn) -> float:
    """Milliseconds: the lower of two do_bench medians, timed apart (a transient clock or
    memory state shows up as a spread between them, which is logged when over 10%)."""
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    first = do_bench(fn, warmup=50, rep=200, return_mode="median")
    second = do_bench(fn, warmup=50, rep=200, return_mode="median")
    if max(first, second) > 1.1 * min(first, second):
        log(f"    (two medians differ: {first * 1e3:.1f} us vs {second * 1e3:.1f} us)")
    return min(first, second)


def sdpa_ms(q, k, v, causal: bool, backend: SDPBackend) -> float | None:
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
    except Exception as e:  # no such backend here, or it refuses these shapes
        log(f"  (SDPA {backend.name} unavailable: {str(e).splitlines()[0][:120]})")
        return None


# (BLOCK_M, BLOCK_N, warps, stages, prefix BLOCK_N)
PREFILL_CONFIGS = [(128, 64, 8, 3, 64), (128, 128, 8, 3, 128), (128, 64, 8, 4, 128),
                   (128, 32, 4, 4, 128), (64, 64, 4, 3, 128), (128, 64, 8, 3, 32)]


def prefill_timings(sweep: bool) -> None:
    log("== prefill timings (bf16, causal, one sequence from scratch unless noted) ==")
    cfg = tb.CUDA_CONFIG
    default = (cfg.prefill_block_m, cfg.prefill_block_n, cfg.prefill_warps, cfg.prefill_stages,
               cfg.prefill_prefix_block_n)
    configs = [default] + [c for c in PREFILL_CONFIGS if c != default] if sweep else [default]
    for model, (h, kvh, d) in MODELS.items():
        cases = [([0], [n]) for n in (2048, 4096, 8192, 16384)]
        cases += [([14336], [2048]), ([0, 0, 1500, 8192, 0], [2048, 777, 3001, 4096, 5000])]
        for ctx, ql in cases:
            ctx, ql = [L(c) if c else 0 for c in ctx], [L(n) for n in ql]
            b = PagedBatch(ctx, ql, h, kvh, d, torch.bfloat16, seed=1)
            flops = sum(4 * h * d * (n * c + n * (n + 1) / 2) for c, n in zip(ctx, ql))
            label = f"{model} N={ql[0]}" if len(ql) == 1 and ctx[0] == 0 else (
                f"{model} {ql[0]} after {ctx[0]}" if len(ql) == 1 else f"{model} ragged {sum(ql)} tok")
            best = None
            for bm, bn, w, s, bnp in configs:
                tiles = torch.from_numpy(build_prefill_tiles(b.qsl, 0, b.seq_lens, bm)).to(DEV)
                out = torch.empty_like(b.q)

                def run(b=b, tiles=tiles, out=out, bm=bm, bn=bn, w=w, s=s, bnp=bnp):
                    prefill_attention(b.q, b.k, b.v, b.kv_cache, b.block_tables, b.seq_lens_t,
                                      tiles, d ** -0.5, out, bm, bn, w, s, bnp)
                try:
                    ms = bench(run)
                except Exception as e:  # a config that does not compile (shared memory, ...)
                    log(f"  {label} cfg {bm}x{bn}/{bnp} w{w} s{s}: failed ({str(e).splitlines()[0][:100]})")
                    continue
                tf = flops / ms / 1e9
                log(f"  {label} cfg {bm}x{bn}/{bnp} w{w} s{s}: {ms:.3f} ms, {tf:.0f} TFLOP/s")
                if (bm, bn, w, s, bnp) == default:
                    best = (ms, tf)
                RESULTS.append(dict(kind="prefill", case=label, cfg=[bm, bn, w, s, bnp], ms=ms, tflops=tf))
            sd = None
            if len(ql) == 1 and ctx[0] == 0:
                qc = b.q.transpose(0, 1).unsqueeze(0).contiguous()
                kc = b.k.transpose(0, 1).unsqueeze(0).contiguous()
                vc = b.v.transpose(0, 1).unsqueeze(0).contiguous()
                sd = sdpa_ms(qc, kc, vc, True, SDPBackend.FLASH_ATTENTION)
                cud = sdpa_ms(qc, kc, vc, True, SDPBackend.CUDNN_ATTENTION)
                if sd:
                    log(f"  {label} SDPA flash: {sd:.3f} ms, {flops / sd / 1e9:.0f} TFLOP/s")
                if cud:
                    log(f"  {label} SDPA cuDNN: {cud:.3f} ms, {flops / cud / 1e9:.0f} TFLOP/s")
            if best:
                RESULTS.append(dict(kind="prefill_row", case=label, ms=best[0], tflops=best[1],
                                    sdpa_ms=sd, sdpa_tflops=flops / sd / 1e9 if sd else None))
            del b
        torch.cuda.empty_cache()


DECODE_CONFIGS = [(64, 4, 3), (32, 4, 3), (128, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3),
                  (128, 8, 3), (32, 2, 4)]


def decode_timings(sweep: bool) -> None:
    log("== decode timings (bf16, one query per sequence, every sequence at the full context) ==")
    cfg = tb.CUDA_CONFIG
    default = (cfg.decode_block_n, cfg.decode_warps, cfg.decode_stages)
    sms = num_sms()
    for model, (h, kvh, d) in MODELS.items():
        for bs, ctx in [(1, 4096), (1, 32768), (64, 4096), (64, 32768)]:
            ctx = L(ctx)
            b = PagedBatch([ctx - 1] * bs, [1] * bs, h, kvh, d, torch.bfloat16, seed=2)
            nbytes = bs * ctx * kvh * d * 2 * b.kv_cache.element_size()
            auto = choose_num_splits(bs, kvh, ctx, sms)
            label = f"{model} bs={bs} ctx={ctx}"
            out = torch.empty_like(b.q)
            variants = [(default, auto)]
            if sweep:
                variants += [(default, s) for s in (1, 2, 4, 8, 16, 32, 64) if s != auto]
                variants += [(c, auto) for c in DECODE_CONFIGS if c != default]
            best = None
            for (bn, w, st), splits in variants:
                def run(b=b, out=out, bn=bn, w=w, st=st, splits=splits):
                    decode_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens_t, d ** -0.5,
                                     splits, out=out, block_n=bn, num_warps=w, num_stages=st)
                try:
                    ms = bench(run)
                except Exception as e:
                    log(f"  {label} cfg n{bn} w{w} s{st} splits={splits}: failed ({str(e).splitlines()[0][:100]})")
                    continue
                tbs = nbytes / ms / 1e9
                log(f"  {label} cfg n{bn} w{w} s{st} splits={splits}: {ms * 1e3:.1f} us, {tbs:.2f} TB/s")
                RESULTS.append(dict(kind="decode", case=label, cfg=[bn, w, st], splits=splits, ms=ms, tbs=tbs))
                if ((bn, w, st), splits) == (default, auto):
                    best = (ms, tbs, splits)
            # SDPA over contiguous K/V: [bs, kv_heads, ctx, d].
            kc = b.kv_cache[0][b.block_tables.long()].reshape(bs, -1, kvh, d)[:, :ctx].transpose(1, 2).contiguous()
            vc = b.kv_cache[1][b.block_tables.long()].reshape(bs, -1, kvh, d)[:, :ctx].transpose(1, 2).contiguous()
            qc = b.q.unsqueeze(2)  # [bs, heads, 1, d]
            sd = sdpa_ms(qc, kc, vc, False, SDPBackend.FLASH_ATTENTION)
            if sd:
                log(f"  {label} SDPA flash (contiguous K/V): {sd * 1e3:.1f} us, {nbytes / sd / 1e9:.2f} TB/s")

            # The same two, replayed from CUDA graphs (as the engine runs decode): eager
            # timings of small cases measure Python launch overhead more than the kernels.
            def triton_default(b=b, out=out, splits=auto):
                decode_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens_t, d ** -0.5, splits,
                                 out=out, block_n=default[0], num_warps=default[1], num_stages=default[2])

            def sdpa_flash(qc=qc, kc=kc, vc=vc):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True)
            tg, sg = graph_ms(triton_default, label), graph_ms(sdpa_flash, label + " SDPA")
            for name, ms in (("triton graph", tg), ("SDPA flash graph", sg)):
                if ms:
                    log(f"  {label} {name}: {ms * 1e3:.1f} us, {nbytes / ms / 1e9:.2f} TB/s")
            if best:
                RESULTS.append(dict(kind="decode_row", case=label, ms=best[0], tbs=best[1], splits=best[2],
                                    sdpa_ms=sd, sdpa_tbs=nbytes / sd / 1e9 if sd else None,
                                    graph_tbs=nbytes / tg / 1e9 if tg else None,
                                    sdpa_graph_tbs=nbytes / sg / 1e9 if sg else None))
            del b, kc, vc, qc, triton_default, sdpa_flash
            torch.cuda.empty_cache()


def graph_ms(fn, label: str) -> float | None:
    """Milliseconds per replay of fn captured in a CUDA graph; None where capture fails."""
    if DEV != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile) outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except Exception as e:
        log(f"  {label}: CUDA-graph timing failed ({str(e).splitlines()[0][:120]})")
        return None


def copy_bandwidth() -> None:
    x = torch.empty(2 * 1024 ** 3 // SCALE, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    log(f"device-to-device copy: {2 * x.numel() / ms / 1e9:.2f} TB/s (read + write)")


def table() -> list[str]:
    rows = ["", "| case | triton | SDPA | ratio (triton/SDPA) |", "| --- | --- | --- | --- |"]
    for r in RESULTS:
        if r["kind"] == "prefill_row":
            sd = f"{r['sdpa_tflops']:.0f} TFLOP/s" if r["sdpa_tflops"] else "-"
            ratio = f"{r['tflops'] / r['sdpa_tflops']:.2f}" if r["sdpa_tflops"] else "-"
            rows.append(f"| prefill {r['case']} | {r['tflops']:.0f} TFLOP/s ({r['ms']:.2f} ms) | {sd} | {ratio} |")
    for r in RESULTS:
        if r["kind"] == "decode_row":
            sd = f"{r['sdpa_tbs']:.2f} TB/s" if r["sdpa_tbs"] else "-"
            ratio = f"{r['tbs'] / r['sdpa_tbs']:.2f}" if r["sdpa_tbs"] else "-"
            rows.append(f"| decode {r['case']} (splits {r['splits']}) | {r['tbs']:.2f} TB/s "
                        f"({r['ms'] * 1e3:.0f} us) | {sd} | {ratio} |")
    for r in RESULTS:
        if r["kind"] == "decode_row" and r.get("graph_tbs") and r.get("sdpa_graph_tbs"):
            rows.append(f"| decode {r['case']}, CUDA-graph replay | {r['graph_tbs']:.2f} TB/s | "
                        f"{r['sdpa_graph_tbs']:.2f} TB/s | {r['graph_tbs'] / r['sdpa_graph_tbs']:.2f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases")
    ap.add_argument("--sweep", choices=["none", "prefill", "decode", "all"], default="none",
                    help="also time other tile configs (and, for decode, split counts)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny shapes on the CPU (run with TRITON_INTERPRET=1): checks the plumbing")
    args = ap.parse_args()
    global DEV, MODELS, SCALE
    if args.cpu_dry_run:
        DEV, MODELS, SCALE = "cpu", {"tiny": (4, 2, 32)}, 256
        name = "CPU dry run"
    else:
        name = torch.cuda.get_device_name(0)
    log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name}, {num_sms()} SMs, "
        f"torch {torch.__version__}, triton {triton.__version__}")
    log(f"kernel config: {tb.CUDA_CONFIG}")
    t0 = time.time()
    try:
        copy_bandwidth()
        if not args.skip_correctness:
            correctness(args.quick)
        log(f"correctness: {len(FAILURES)} failures ({time.time() - t0:.0f} s so far)")
        prefill_timings(args.sweep in ("prefill", "all"))
        log(f"({time.time() - t0:.0f} s so far)")
        decode_timings(args.sweep in ("decode", "all"))
    except Exception:
        log(traceback.format_exc())
        FAILURES.append("exception")
    finally:
        for line in table():
            log(line)
        log(f"\nfailures: {FAILURES or 'none'}; total {time.time() - t0:.0f} s")
        out_dir = os.environ.get("OUT")
        if out_dir:
            with open(os.path.join(out_dir, "kernels.json"), "w") as f:
                json.dump(RESULTS, f, indent=1)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
