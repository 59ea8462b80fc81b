"""Quantized linear layers and decoding on the GPU (H200), dummy Llama-3.1-8B shape.

  (a) kernels: each format's linear at Llama-3.1-8B shapes (4096->6144 qkv, 4096->4096 o,
      4096->28672 gate_up, 14336->4096 down), M = 1 and 64 rows, vs bf16 F.linear (cuBLAS).
      Timed as CUDA-graph replays of 20 back-to-back calls (launch overhead excluded, as
      under ember's decode graphs). Activation quantization is included for fp8 / int8.
  (b) end to end: LLM(config.json, load_format="dummy", quantization=q, dtype=bfloat16):
      batch-1 decode tok/s and batch-64 output throughput. Methods: bf16, the formats, their
      VARIANTS, and FLOOR_VARIANTS ('awq-floor', 'awq-floor+head': the INT4 GEMVs replaced
      by a kernel that reads their bytes and decodes nothing, a timing experiment).

  PYTHONPATH=$PWD python bench/quant_gpu.py --out bench/results/quant_h200.json
  CPU dry run of the script's logic (tiny shapes, Triton interpreter, torch paths):
  TRITON_INTERPRET=1 PYTHONPATH=$PWD python bench/quant_gpu.py --tiny
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from gpu_timing import capture, graph_replay_ms

SHAPES_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
SHAPES_TINY = {"qkv": (128, 192), "down": (256, 128)}


def timer(fn, device: torch.device, reps: int = 20, iters: int = 10) -> float:
    """Microseconds per call of fn()."""
    if device.type != "cuda":
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    g = capture(fn, reps)   # after warm-up calls: compile, autotune, cuBLAS heuristics
    return graph_replay_ms(g, iters) * 1e3 / reps


# Variants of a method: its QuantConfig params (A/B runs of the small-batch kernels).
VARIANTS = {
    "fp8-w8a8": ("fp8", {"decode_kernel": "scaled_mm"}),   # decode rows on W8A8 (_scaled_mm)
    "fp8-gemv": ("fp8", {"decode_kernel": "gemv"}),        # CUDA-core GEMV, no tensor cores
    "awq-gemv": ("awq", {"small_batch_kernel": "gemv", "large_batch_kernel": "gemm"}),  # CUDA-core kernels only
    "awq-fused-gemm": ("awq", {"large_batch_kernel": "gemm"}),   # > 64 rows: fused W4A16 GEMM
    "awq-skinny": ("awq", {"small_batch_kernel": "skinny"}),    # 2-8 rows on the skinny kernel, not the MMA GEMV
    "awq+head": ("awq", {"lm_head": True}),        # --quantize-lm-head: the LM head in INT4 too
    "fp8+head": ("fp8", {"lm_head": True}),
    "nvfp4+head": ("nvfp4", {"lm_head": True}),
    "nvfp4-gemv": ("nvfp4", {"small_batch_kernel": "gemv"}),    # 1-8 rows on CUDA cores, not the MMA GEMV
}


# The floor under the INT4 GEMVs: AWQ with every one-row INT4 linear replaced by a kernel
# that reads the same bytes and decodes nothing (bench/stream_probe.py's int4_floor_gemv;
# its output is zeros, so the tokens mean nothing): what batch 1 would reach if the INT4
# GEMVs cost no more than streaming their weights, with every other kernel as it is.
FLOOR_VARIANTS = {"awq-floor": "awq", "awq-floor+head": "awq+head"}


@contextlib.contextmanager
def floor_gemvs(method: str):
    """Within: a FLOOR_VARIANTS method's one-row INT4 linears run the floor kernel."""
    if method not in FLOOR_VARIANTS:
        yield
        return
    from stream_probe import int4_floor_gemv
    from ember.quant.awq import Int4LinearMethod
    apply = Int4LinearMethod.apply

    def floor_apply(self, layer, x):
        if x.is_cuda and x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
            return int4_floor_gemv(x.reshape(1, -1), layer.qweight, layer.scales, layer.qzeros).reshape(
                *x.shape[:-1], -1)
        return apply(self, layer, x)
    Int4LinearMethod.apply = floor_apply
    try:
        yield
    finally:
        Int4LinearMethod.apply = apply


def quant_config(method: str):
    """A method name or one of VARIANTS."""
    from ember.quant.base import QuantConfig
    if method == "bf16":
        return None
    name, params = VARIANTS.get(method, (method, {}))
    return QuantConfig(name, params=dict(params))


def use_variant(method: str) -> str | None:
    """The `quantization` argument for LLM(); a variant's params are added by wrapping the
    config resolution the loader calls (LLM takes only a method name)."""
    import ember.quant as quant
    from ember.quant.base import resolve_quant_config
    if method == "bf16":
        quant.resolve_quant_config = resolve_quant_config
        return None
    method = FLOOR_VARIANTS.get(method, method)
    name, params = VARIANTS.get(method, (method, {}))

    def resolve(q, hf, *rest):
        cfg = resolve_quant_config(q, hf, *rest)
        if cfg is not None:
            cfg.params.update(params)
        return cfg
    quant.resolve_quant_config = resolve
    return name


def make_layer(method: str, k: int, n: int, device: torch.device, dtype: torch.dtype):
    """A quantized ember Linear of shape [n, k] from random weights (quantize-on-load path)."""
    from ember.layers.linear import Linear
    from ember.quant.base import linear_method_for
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lin = Linear(k, n, method=linear_method_for(quant_config(method)))
            lin.weight.data.normal_(0, 0.02)
            lin.method.finalize(lin)
    finally:
        torch.set_default_dtype(prev)
    return lin


def weight_bytes(lin) -> int:
    return sum(p.numel() * p.element_size() for p in lin.parameters())


def bench_kernels(shapes: dict, rows: list[int], methods: list[str], device: torch.device,
                  dtype: torch.dtype) -> list[dict]:
    out = []
    for name, (k, n) in shapes.items():
        for method in methods:
            lin = make_layer(method, k, n, device, dtype)
            for m in rows:
                x = torch.randn(m, k, device=device, dtype=dtype)
                with torch.inference_mode():
                    ref = F.linear(x.float(), lin.method.dequantize(lin).float()) if method != "bf16" else None
                    y = lin(x)
                    if ref is not None:  # the kernel computes what its format's weights say
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        assert err < 0.1, f"{method} {name} M={m}: relative error {err}"
                    us = timer(lambda: lin(x), device)
                row = {"shape": name, "k": k, "n": n, "m": m, "method": method, "us": round(us, 2),
                       "weight_MB": round(weight_bytes(lin) / 1e6, 2),
                       "GBps": round(weight_bytes(lin) / us / 1e3, 1)}
                out.append(row)
                print(json.dumps(row), flush=True)
            del lin
            gc.collect()
    # speedups vs bf16
    base = {(r["shape"], r["m"]): r["us"] for r in out if r["method"] == "bf16"}
    print("\n| shape (K->N) | M | " + " | ".join(methods) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in methods) + " |")
    for name, (k, n) in shapes.items():
        for m in rows:
            cells = []
            for method in methods:
                r = next(r for r in out if r["shape"] == name and r["m"] == m and r["method"] == method)
                sp = base.get((name, m), r["us"]) / r["us"]
                cells.append(f"{r['us']:.1f} us ({sp:.2f}x)")
            print(f"| {name} {k}->{n} | {m} | " + " | ".join(cells) + " |")
    return out


def tuned_tiles() -> str:
    """The quantized kernels' tuned tile per (kernel, format, rows, N, K, group) key."""
    from ember.quant.kernels.splitk import _TUNED
    return json.dumps({" ".join(map(str, k)): list(v) for k, v in _TUNED.items()})


def bench_e2e(model: str, methods: list[str], prompt_len: int, decode_len: int, batch: int,
              tput_len: int, budget_s: float, max_model_len: int) -> list[dict]:
    from ember import LLM, SamplingParams
    start = time.perf_counter()
    results = []
    for method in methods:
        if time.perf_counter() - start > budget_s:
            print(f"# time budget spent: skipping {method}", flush=True)
            continue
        with floor_gemvs(method):
            t0 = time.perf_counter()
            llm = LLM(model, load_format="dummy", dtype="bfloat16" if torch.cuda.is_available() else "float32", max_num_seqs=batch,
                      max_model_len=max_model_len, quantization=use_variant(method),
                      prefix_cache="none")
            load_s = time.perf_counter() - t0
            vocab = llm.engine.model_config.vocab_size
            g = torch.Generator().manual_seed(0)

            def seconds(n_req: int, n_out: int) -> float:
                prompts = [{"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()}
                           for _ in range(n_req)]
                sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=n_out)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t = time.perf_counter()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                assert all(len(o.outputs[0].token_ids) == n_out for o in outs)
                return time.perf_counter() - t

            seconds(1, 8)  # warm-up (compiles, and tunes the kernels at one row)
            seconds(batch, 8)  # and at 2..batch rows, so that no tuning falls inside a timed run
            decode_s = seconds(1, decode_len)
            # One request's prefill and first token (the median of three): what the batch-1
            # figure spends besides decode steps.
            first_s = sorted(seconds(1, 1) for _ in range(3))[1]
            tput = batch * tput_len / seconds(batch, tput_len)
            wbytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
            row = {"method": method, "load_s": round(load_s, 1), "weight_GB": round(wbytes / 1e9, 2),
                   "decode_bs1_tok_s": round(decode_len / decode_s, 1),
                   "first_token_ms": round(first_s * 1e3, 1),
                   "decode_steps_bs1_tok_s": round((decode_len - 1) / (decode_s - first_s), 1),
                   f"throughput_bs{batch}_tok_s": round(tput, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
            print("# tiles the kernels' tuner chose so far:", tuned_tiles(), flush=True)
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = next((r for r in results if r["method"] == "bf16"), None)
    if base:
        print(f"\n| format | weights GB | batch-1 decode tok/s (x bf16) | first token ms | batch-1 "
              f"decode steps tok/s (x bf16) | batch-{batch} tok/s (x bf16) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in results:
            t, d = f"throughput_bs{batch}_tok_s", "decode_steps_bs1_tok_s"
            print(f"| {r['method']} | {r['weight_GB']} | {r['decode_bs1_tok_s']} "
                  f"({r['decode_bs1_tok_s'] / base['decode_bs1_tok_s']:.2f}x) | {r['first_token_ms']} | "
                  f"{r[d]} ({r[d] / base[d]:.2f}x) | {r[t]} ({r[t] / base[t]:.2f}x) |")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama-3.1-8b/config.json")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at tiny shapes")
    ap.add_argument("--kernel-methods", nargs="*", default=["bf16", "awq", "nvfp4", "fp8", "fp8-w8a8", "smoothquant"])
    ap.add_argument("--e2e-methods", nargs="*", default=["bf16", "awq", "fp8", "nvfp4"])
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tput-len", type=int, default=256)
    ap.add_argument("--e2e-budget-s", type=float, default=270, help="start no new e2e config after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print("#", json.dumps(info), flush=True)
    result: dict = {"info": info}
    if args.tiny:
        import tempfile
        model = os.path.join(tempfile.mkdtemp(), "config.json")
        with open(model, "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128,
                       "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}, f)
        shapes, rows = SHAPES_TINY, [1, 20]
        args.model, args.prompt_len, args.decode_len, args.batch, args.tput_len = model, 8, 8, 4, 4
    else:
        shapes, rows = SHAPES_8B, [1, 64]
    t = time.perf_counter()
    if not args.skip_kernels:
        result["kernels"] = bench_kernels(shapes, rows, args.kernel_methods, device, dtype)
        print(f"# kernels: {time.perf_counter() - t:.0f} s", flush=True)
    if not args.skip_e2e:
        result["e2e"] = bench_e2e(args.model, args.e2e_methods, args.prompt_len, args.decode_len,
                                  args.batch, args.tput_len, args.e2e_budget_s, 1024)
        print(f"# total: {time.perf_counter() - t:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
