"""MLA decode on a GPU: ember's Triton kernel (ember.attention.triton_mla) against torch.

    PYTHONPATH=$PWD python3 bench/mla_gpu.py [--quick] [--sweep] [--out PATH.json|PATH.txt]
    PYTHONPATH=$PWD python3 bench/mla_gpu.py --cpu-dry-run   # tiny shapes, Triton interpreter

Absorbed decode over the paged latent cache [blocks, 16, R + P], R = 512, P = 64, bf16, at
DeepSeek-V2-Lite's 16 heads and DeepSeek-V3's 128; batch 1 / 64 / 256, context 1k-32k
(every sequence at the full context; --quick runs fewer cases).

(a) Correctness at real shapes against mla_decode_ref (fp32 math on the same inputs):
    ragged lengths with a padding row (0) and a 1-token row, split counts 1 / auto / 7,
    fp32 inputs once, a CUDA-graph replay on new lengths and block tables, and the torch
    peers themselves.
(b) Times: `copies` independent input sets in one pool (enough to exceed the 50 MB L2, so
    small cases read HBM), one call per set captured in a CUDA graph, replayed
    (bench/gpu_timing.py). Achieved bandwidth counts the bytes a decode must move: the
    latent rows read once + q + out (not the split partials, which are the kernel's own
    overhead). The 128-head shape does ~230 FLOP per latent byte, about the H200's bf16
    ridge point, so its TFLOP/s are printed too.
    Peer: the faster of (1) batched matmul + softmax + matmul over a contiguous latent and
    (2) torch SDPA with the heads as the query rows of one MQA head (K = [c, pe], V = c),
    each backend that accepts a 576/512 head dim. The peers get the latent already
    gathered into contiguous [B, ctx, R + P] (the gather is not timed), so the ratio
    flatters torch. --sweep also times other tile configs and split counts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import astuple

if "--cpu-dry-run" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from ember.attention.mla_ref import mla_decode_ref  # noqa: E402
from ember.attention.triton_mla import (MlaKernelConfig, choose_num_splits,  # noqa: E402
                                        default_config, mla_decode)
from gpu_timing import graph_replay_ms  # noqa: E402

DEV = "cuda"
RANK, ROPE, BLOCK_SIZE = 512, 64, 16
SCALE = 192 ** -0.5  # DeepSeek: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)
HBM_TBS = 4.8
L2_BYTES = 50 * 2 ** 20
HEADS = [16, 128]
FULL_CASES = [(b, c) for b in (1, 64, 256) for c in (1024, 4096, 16384, 32768)]
QUICK_CASES = [(1, 4096), (1, 32768), (64, 4096), (64, 32768), (256, 4096)]
# SDPA explains at length why each backend it was told to use refuses a head dim of 576.
warnings.filterwarnings("ignore", category=UserWarning,
                        message=".*(kernel not used|requires q,k,v|[Mm]emory [Ee]fficient|cuDNN|[Ff]lash).*")
TOL = {torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
LOG: list[str] = []
REPORT: dict = {"info": {}, "correctness": [], "rows": [], "sweep": [], "failures": []}
OUT_PATH: str | None = None
UNAVAILABLE: set[str] = set()  # peers that refused the shapes once: not tried again


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def save() -> None:
    """Rewritten after every case, so a run cut off at a time limit keeps what it measured."""
    if not OUT_PATH:
        return
    with open(OUT_PATH, "w") as f:
        if OUT_PATH.endswith(".json"):
            json.dump({**REPORT, "log": LOG}, f, indent=1)
        else:
            f.write("\n".join(LOG) + "\n")


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def guarded(name: str, fn) -> None:
    """Run one correctness block; an exception there is a failure, not the end of the run."""
    try:
        fn()
    except Exception:
        log(f"  [FAIL] {name}: exception\n{traceback.format_exc()}")
        REPORT["failures"].append(name)


def check(name: str, err: float, tol: float) -> None:
    ok = err < tol
    log(f"  [{'ok' if ok else 'FAIL'}] {name}: rel err {err:.2e} (tol {tol:.0e})")
    REPORT["correctness"].append(dict(name=name, err=err, tol=tol, ok=ok))
    if not ok:
        REPORT["failures"].append(name)


class PagedLatent:
    """`copies` independent batches with the given lengths in one paged latent pool (blocks
    shuffled, so every sequence's rows are scattered as in a live cache); q_nope / q_rope
    are views of one [B, H, R + P] projection per copy."""

    def __init__(self, lens: list[int], heads: int, dtype: torch.dtype, copies: int = 1,
                 seed: int = 0) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.lens, self.heads, self.copies = lens, heads, copies
        nblocks = [-(-n // BLOCK_SIZE) for n in lens]
        width = max(1, max(nblocks))
        pool = copies * sum(nblocks) + 1
        self.cache = torch.randn((pool, BLOCK_SIZE, RANK + ROPE), device=DEV, dtype=dtype, generator=g)
        perm = torch.randperm(pool, device=DEV, generator=g).int()
        self.tables = torch.zeros((copies, len(lens), width), dtype=torch.int32, device=DEV)
        used = 0
        for k in range(copies):
            for i, nb in enumerate(nblocks):
                self.tables[k, i, :nb] = perm[used:used + nb]
                used += nb
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        self.q = torch.randn((copies, len(lens), heads, RANK + ROPE), device=DEV, dtype=dtype, generator=g)
        self.out = torch.empty((copies, len(lens), heads, RANK), device=DEV, dtype=dtype)

    def args(self, k: int = 0) -> tuple:
        return (self.q[k, ..., :RANK], self.q[k, ..., RANK:], self.cache, self.tables[k], self.seq_lens)

    def ref(self, k: int = 0) -> torch.Tensor:
        return mla_decode_ref(*self.args(k), SCALE)

    def contiguous_latent(self, k: int = 0) -> torch.Tensor:
        """[B, ctx, R + P] for equal lengths: what the torch peers read."""
        assert len(set(self.lens)) == 1
        return self.cache[self.tables[k].long()].flatten(1, 2)[:, :self.lens[0]].contiguous()


# ---- torch peers (equal lengths, contiguous latent) -------------------------------------
def torch_bmm(q: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """q: [B, H, R + P]; lat: [B, L, R + P] -> [B, H, R]. Two batched GEMMs around a softmax
    (fp32 inside, bf16 in and out)."""
    scores = torch.bmm(q * SCALE, lat.transpose(1, 2))  # [B, H, L]
    return torch.bmm(torch.softmax(scores, dim=-1), lat[..., :RANK])


def torch_sdpa(q: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """One MQA head whose query rows are the H heads (decode has one query per head, and
    without a causal mask rows are independent): K = [c, pe] (576 wide), V = c (512)."""
    return F.scaled_dot_product_attention(q.unsqueeze(1), lat.unsqueeze(1),
                                          lat[..., :RANK].unsqueeze(1), scale=SCALE).squeeze(1)


SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]


def peers() -> dict:
    """name -> fn(q [B, H, R + P], lat [B, L, R + P]) -> [B, H, R]."""
    out = {"bmm+softmax": torch_bmm}
    for backend in SDPA_BACKENDS:
        def run(q, lat, backend=backend):
            with sdpa_kernel(backend):
                return torch_sdpa(q, lat)
        out[f"SDPA {backend.name.lower()}"] = run
    return out


# ---- (a) correctness ----------------------------------------------------------------------
def correctness(heads_list: list[int], long_len: int) -> None:
    log("== correctness at real shapes (R=512, P=64, block 16) against mla_decode_ref ==")
    for h in heads_list:
        guarded(f"H={h} ragged bf16", lambda h=h: check_ragged(h, long_len))
        guarded(f"H={h} fp32", lambda h=h: check_fp32(h))
        guarded(f"H={h} peers", lambda h=h: check_peers(h))
        if DEV == "cuda":
            guarded(f"H={h} CUDA-graph replay", lambda h=h: graph_replay_check(h, long_len))
            torch.cuda.empty_cache()


def check_ragged(h: int, long_len: int) -> None:
    lens = [0, 1, 17, 1000, 4097, long_len]  # a padding row, one token, ragged, long
    b = PagedLatent(lens, h, torch.bfloat16, seed=h)
    ref = b.ref()
    auto = choose_num_splits(len(lens), h, max(lens), num_sms())
    for splits in sorted({1, auto, 7}):
        out = torch.full_like(b.out[0], float("nan"))
        mla_decode(*b.args(), SCALE, out=out, num_splits=splits)
        check(f"H={h} bf16 lens {lens} splits={splits}", rel_err(out, ref), TOL[torch.bfloat16])
        check(f"H={h} splits={splits} padding row is zeros", float(out[0].abs().max()), 1e-30)


def check_fp32(h: int) -> None:
    b = PagedLatent([0, 1, 17, 1000, 4097], h, torch.float32, seed=h + 1)
    check(f"H={h} fp32 lens {b.lens} splits=auto", rel_err(mla_decode(*b.args(), SCALE), b.ref()),
          TOL[torch.float32])


def check_peers(h: int) -> None:
    """The peers, on equal lengths (they have no masking)."""
    b = PagedLatent([3000] * 4, h, torch.bfloat16, seed=h + 2)
    ref = b.ref()
    lat = b.contiguous_latent()
    for name, fn in peers().items():
        try:
            out = fn(b.q[0], lat)
        except Exception as e:  # a backend that refuses these head dims
            log(f"  H={h} peer {name}: unavailable ({str(e).splitlines()[0][:120]})")
            UNAVAILABLE.add(name)
            continue
        check(f"H={h} peer {name}", rel_err(out, ref), TOL[torch.bfloat16])


def graph_replay_check(heads: int, max_len: int) -> None:
    """Capture with one split count for max_len, then replay on new lengths (a padding row
    of 0 and one of 1 among them), new block tables and new queries copied into the
    captured tensors, as the engine's graph runner does."""
    bs = 8
    cap = PagedLatent([max_len] * bs, heads, torch.bfloat16, seed=21)
    cache = cap.cache
    tables, seq_lens, q = cap.tables[0].clone(), cap.seq_lens.clone(), cap.q[0].clone()
    out = torch.empty_like(cap.out[0])
    splits = choose_num_splits(bs, heads, max_len, num_sms())

    def call() -> None:
        mla_decode(q[..., :RANK], q[..., RANK:], cache, tables, seq_lens, SCALE, out=out, num_splits=splits)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    new_lens = [0, 1, 5, max_len, max_len // 3, 17, 33, max_len - 1]
    new = PagedLatent(new_lens, heads, torch.bfloat16, seed=22)
    assert new.cache.shape[0] <= cache.shape[0]
    cache[:new.cache.shape[0]].copy_(new.cache)
    tables.zero_()
    tables[:, :new.tables.shape[2]].copy_(new.tables[0])
    seq_lens.copy_(new.seq_lens)
    q.copy_(new.q[0])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    new.cache = cache
    new.tables = tables.unsqueeze(0)
    check(f"H={heads} CUDA-graph replay (splits={splits}) on new lengths {new_lens}",
          rel_err(out, new.ref()), TOL[torch.bfloat16])


# ---- (b) timings --------------------------------------------------------------------------
def time_us(calls: list) -> float:
    """Microseconds per call: all `calls` (one per rotating input set) captured in one CUDA
    graph, replayed for ~30 ms, the lower of two averages. On the CPU (dry run): one pass."""
    if DEV != "cuda":
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e6 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, pick GEMM kernels, outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    est = graph_replay_ms(graph, 1)
    reps = max(3, min(200, int(30 / max(est, 1e-3))))
    ms = min(graph_replay_ms(graph, reps), graph_replay_ms(graph, reps))
    del graph
    return ms * 1e3 / len(calls)


def copies_for(batch: int, ctx: int) -> int:
    """Input sets to rotate through: 3x the L2 in all, at most 128."""
    per_set = batch * ctx * (RANK + ROPE) * 2
    return max(1, min(128, math.ceil(3 * L2_BYTES / per_set)))


def fits(heads: int, batch: int, ctx: int, copies: int) -> bool:
    if DEV != "cuda":
        return True
    lat = copies * batch * ctx * (RANK + ROPE) * 2
    scores = batch * heads * ctx * 2 * 3  # the bmm peer's scores and probabilities, with slack
    return 2 * lat + scores < 0.85 * torch.cuda.mem_get_info()[0]


def case_bytes(heads: int, batch: int, ctx: int) -> int:
    return batch * ctx * (RANK + ROPE) * 2 + batch * heads * (RANK + ROPE) * 2 + batch * heads * RANK * 2


def case_flops(heads: int, batch: int, ctx: int) -> float:
    return batch * heads * ctx * (2.0 * (RANK + ROPE) + 2.0 * RANK)


def sweep_variants(heads: int, default: MlaKernelConfig, auto: int, ctx: int) -> list[tuple[MlaKernelConfig, int]]:
    if heads <= 16:
        tiles = [(16, 16, 4, 2), (16, 64, 4, 2), (16, 32, 4, 3), (16, 32, 4, 1), (16, 32, 8, 2),
                 (16, 64, 8, 3)]
    else:
        tiles = [(16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 4, 2), (32, 64, 8, 2), (32, 32, 8, 3),
                 (64, 16, 8, 2), (64, 32, 8, 2)]
    out = [(MlaKernelConfig(*t), auto) for t in tiles if MlaKernelConfig(*t) != default]
    out += [(default, s) for s in (1, 2, 4, 8, 16, 32, 64, 128) if s != auto and s * 64 <= ctx]
    return out


def timings(cases: list[tuple[int, int]], heads_list: list[int], sweep: bool) -> None:
    log("== timings (bf16, every sequence at the full context; us per call, CUDA-graph replay) ==")
    sms = num_sms()
    peer_fns = peers()
    for h in heads_list:
        for batch, ctx in cases:
            label = f"H={h} B={batch} ctx={ctx}"
            copies = copies_for(batch, ctx)
            if not fits(h, batch, ctx, copies):
                log(f"  {label}: skipped (does not fit in free GPU memory)")
                continue
            try:
                b = PagedLatent([ctx] * batch, h, torch.bfloat16, copies=copies, seed=batch + ctx)
                nbytes, flops = case_bytes(h, batch, ctx), case_flops(h, batch, ctx)
                auto = choose_num_splits(batch, h, ctx, sms)
                cfg = default_config(h, DEV == "cuda")

                def kernel_calls(cfg: MlaKernelConfig, splits: int, b: PagedLatent = b) -> list:
                    return [lambda k=k: mla_decode(*b.args(k), SCALE, out=b.out[k], num_splits=splits,
                                                   config=cfg) for k in range(b.copies)]
                us = time_us(kernel_calls(cfg, auto))
                row = dict(heads=h, batch=batch, ctx=ctx, copies=copies, splits=auto,
                           config=list(astuple(cfg)), triton_us=us,
                           triton_gbs=nbytes / us / 1e3, triton_tflops=flops / us / 1e6, peers={})
                log(f"  {label} (x{copies} sets): triton splits={auto} {us:9.1f} us  "
                    f"{row['triton_gbs']:7.0f} GB/s ({row['triton_gbs'] / HBM_TBS / 10:.0f}% of "
                    f"{HBM_TBS} TB/s)  {row['triton_tflops']:.0f} TFLOP/s")
                lats = [b.contiguous_latent(k) for k in range(copies)]
                qs = [b.q[k] for k in range(copies)]
                for name, fn in peer_fns.items():
                    if name in UNAVAILABLE:
                        continue
                    try:
                        pu = time_us([lambda fn=fn, q=q, lat=lat: fn(q, lat) for q, lat in zip(qs, lats, strict=True)])
                    except Exception as e:
                        log(f"    peer {name}: unavailable ({str(e).splitlines()[0][:100]})")
                        UNAVAILABLE.add(name)
                        continue
                    row["peers"][name] = pu
                    log(f"    peer {name:22s} {pu:9.1f} us  {nbytes / pu / 1e3:7.0f} GB/s  "
                        f"triton is {pu / us:.2f}x faster")
                del lats, qs
                if row["peers"]:
                    best = min(row["peers"], key=row["peers"].get)
                    row.update(peer=best, peer_us=row["peers"][best], ratio=row["peers"][best] / us)
                REPORT["rows"].append(row)
                if sweep:
                    results = [(us, cfg, auto)]
                    REPORT["sweep"].append(dict(heads=h, batch=batch, ctx=ctx, config=list(astuple(cfg)),
                                                splits=auto, auto_splits=auto, us=us, gbs=nbytes / us / 1e3))
                    for vcfg, vs in sweep_variants(h, cfg, auto, ctx):
                        try:
                            vu = time_us(kernel_calls(vcfg, vs))
                        except Exception as e:  # out of shared memory or registers
                            log(f"    sweep {vcfg} splits={vs}: failed ({str(e).splitlines()[0][:100]})")
                            continue
                        results.append((vu, vcfg, vs))
                        REPORT["sweep"].append(dict(heads=h, batch=batch, ctx=ctx, config=list(astuple(vcfg)),
                                                    splits=vs, auto_splits=auto, us=vu, gbs=nbytes / vu / 1e3))
                        log(f"    sweep {vcfg} splits={vs}: {vu:9.1f} us {nbytes / vu / 1e3:7.0f} GB/s")
                    bu, bc, bsp = min(results, key=lambda r: r[0])
                    log(f"    best: {bc} splits={bsp} {bu:.1f} us ({us / bu:.2f}x the default)")
                del b
            except Exception:
                log(f"  {label}: FAILED\n{traceback.format_exc()}")
                REPORT["failures"].append(label)
            if DEV == "cuda":
                torch.cuda.empty_cache()
            save()


def table() -> list[str]:
    rows = ["", "| heads | batch | ctx | splits | triton us | GB/s | % of 4.8 TB/s | TFLOP/s | "
            "torch peer | peer us | triton / peer speed |", "|" + " --- |" * 11]
    for r in REPORT["rows"]:
        peer = (f"{r['peer']} | {r['peer_us']:.1f} | {r['ratio']:.2f}x" if r.get("peer") else "- | - | -")
        rows.append(f"| {r['heads']} | {r['batch']} | {r['ctx']} | {r['splits']} | {r['triton_us']:.1f} | "
                    f"{r['triton_gbs']:.0f} | {r['triton_gbs'] / HBM_TBS / 10:.0f}% | "
                    f"{r['triton_tflops']:.0f} | {peer} |")
    rows += sweep_summary()
    return rows


def sweep_summary() -> list[str]:
    """Per head count: each tile config's total time over the cases at the automatic split
    count (only configs measured in every case), to pick a default from."""
    rows = []
    for h in sorted({r["heads"] for r in REPORT["sweep"]}):
        at_auto = [r for r in REPORT["sweep"] if r["heads"] == h and r["splits"] == r["auto_splits"]]
        cases = {(r["batch"], r["ctx"]) for r in at_auto}
        totals: dict[tuple, list[float]] = {}
        for r in at_auto:
            totals.setdefault(tuple(r["config"]), []).append(r["us"])
        ranked = sorted((sum(v), c) for c, v in totals.items() if len(v) == len(cases))
        rows.append(f"\nsweep, {h} heads, sum over {len(cases)} cases at auto splits "
                    "(block_h, block_n, warps, stages):")
        rows += [f"  {c}: {t:.1f} us" for t, c in ranked]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"timing cases {QUICK_CASES} only")
    ap.add_argument("--sweep", action="store_true", help="also time other tile configs and split counts")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--out", help="write the raw output here: JSON if it ends in .json, else the text log")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU: checks the plumbing")
    args = ap.parse_args()
    global DEV, RANK, ROPE, OUT_PATH, L2_BYTES
    OUT_PATH = args.out
    if OUT_PATH and os.path.dirname(OUT_PATH):
        os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    cases = QUICK_CASES if args.quick else FULL_CASES
    heads_list, long_len = HEADS, 16389
    if args.cpu_dry_run:
        DEV, RANK, ROPE, L2_BYTES = "cpu", 64, 16, 2 ** 16
        cases, heads_list, long_len = [(1, 40), (3, 100)], [4, 16], 70
        name = "CPU dry run (Triton interpreter)"
    else:
        name = torch.cuda.get_device_name(0)
    REPORT["info"] = dict(device=name, sms=num_sms(), torch=torch.__version__, triton=triton.__version__,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:],
                          rank=RANK, rope=ROPE, block_size=BLOCK_SIZE, scale=SCALE)
    log(f"{REPORT['info']['date']} {name}, {num_sms()} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}; R={RANK} P={ROPE} block {BLOCK_SIZE}")
    for h in heads_list:
        log(f"default config for {h} heads: {default_config(h, DEV == 'cuda')}")
    t0 = time.time()
    torch.manual_seed(0)
    try:
        if not args.skip_correctness:
            correctness(heads_list, long_len)
            log(f"correctness: {len(REPORT['failures'])} failures ({time.time() - t0:.0f} s)")
            save()
        timings(cases, heads_list, args.sweep)
    except Exception:
        log(traceback.format_exc())
        REPORT["failures"].append("exception")
    finally:
        for line in table():
            log(line)
        log(f"\nfailures: {REPORT['failures'] or 'none'}; total {time.time() - t0:.0f} s")
        save()
    return 1 if REPORT["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
