"""Accuracy of every quantization format on the real SmolLM2-135M-Instruct (CPU, fp32
compute): perplexity on the last 20% of each text, calibrated on the first 80%.

  python bench/quant_accuracy.py --texts ../shared/data/tinystories_sample.txt ../shared/data/wizard_of_oz.txt

The model was distributed as GGUF Q4_1 (embedding Q8_0): "fp32" is those dequantized
weights, so every format here re-quantizes weights that were already 4-bit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import torch

from ember import LLM
from ember.eval.ppl import perplexity, read_split
from ember.quant.base import effective_group_size
from ember.quant.calibrate import calibration_sequences, collect_input_stats
from ember.quant.cli import quantize_llm

# name -> (ember quantize method, extra QuantConfig params, AWQ search options)
CONFIGS = {
    "fp32": (None, {}, {}),
    "RTN-INT4 g128": ("rtn", {}, {}),
    "AWQ-INT4 g128": ("awq", {}, {}),                       # the default: linear loss + clipping
    "AWQ-INT4 g128 no clip": ("awq", {}, {"clip": False}),
    "AWQ-INT4 g128 block loss": ("awq", {}, {"loss": "block"}),
    "AWQ-INT4 g128 duo": ("awq", {}, {"duo": True}),
    "AWQ-INT4 g128 sequential": ("awq", {}, {"sequential": True}),
    "NVFP4 weight-only": ("nvfp4", {}, {}),
    "NVFP4 W4A4 (emulated)": ("nvfp4", {"activations": "nvfp4"}, {}),
    "SmoothQuant W8A8 a=0.5": ("smoothquant", {}, {}),
    "FP8 W8A8 (emulated on CPU)": ("fp8", {"emulate_activations": True}, {}),
    "FP8 weight-only (CPU path)": ("fp8", {}, {}),
    # --quantize-lm-head / `ember quantize --lm-head`: the (tied) LM head in the same format
    "RTN-INT4 g128 + INT4 LM head": ("rtn", {"lm_head": True}, {}),
    "AWQ-INT4 g128 + INT4 LM head": ("awq", {"lm_head": True}, {}),   # the head searched too (awq_head)
    "FP8 W8A8 (emulated on CPU) + FP8 LM head": ("fp8", {"emulate_activations": True, "lm_head": True}, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", nargs="+", required=True)
    ap.add_argument("--split", type=float, default=0.8)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored per text")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-skip", type=int, default=0,
                    help="calibrate on each text's sequences after its first K (another window of the first 80%%)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    def load() -> LLM:
        return LLM(args.model, dtype="float32", max_model_len=max(args.window, args.calib_len) + 1,
                   num_kv_blocks=(max(args.window, args.calib_len) + 16) // 16 + 1, prefix_cache="none")

    llm = load()
    tok = llm.get_tokenizer()
    cfg = llm.engine.model_config
    evals = {p: tok.encode(read_split(p, args.split), add_special_tokens=False)[:args.eval_tokens + 1]
             for p in args.texts}
    print(f"# {datetime.date.today()} {platform.machine()} torch {torch.__version__} threads "
          f"{torch.get_num_threads()}; model {args.model}; eval: last {100 * (1 - args.split):.0f}% of "
          f"each text, first {args.eval_tokens} tokens, window {args.window} stride {args.stride}; "
          f"calibration: {args.calib_seqs} x {args.calib_len} tokens from the first "
          f"{100 * args.split:.0f}% (after each text's first {args.calib_skip} sequences)", flush=True)
    groups = {n: effective_group_size(k, args.group_size) for n, k in
              [("qkv/gate_up (in %d)" % cfg.hidden_size, cfg.hidden_size),
               ("o (in %d)" % (cfg.num_attention_heads * cfg.head_dim), cfg.num_attention_heads * cfg.head_dim),
               ("down (in %d)" % cfg.intermediate_size, cfg.intermediate_size)]}
    print(f"# INT4 group sizes used (largest divisor <= {args.group_size}): {groups}", flush=True)
    stats = None
    if any(CONFIGS[c][0] in ("awq", "smoothquant") and not CONFIGS[c][2].get("sequential")
           for c in args.configs):
        t = time.perf_counter()
        skip = args.calib_skip * len(args.texts)    # the texts' sequences alternate
        seqs = calibration_sequences(tok, args.texts, args.calib_seqs + skip, args.calib_len, args.split)[skip:]
        block = any(CONFIGS[c][2].get("loss") == "block" for c in args.configs)
        gram = any(CONFIGS[c][0] == "awq" for c in args.configs)   # AWQ's losses over every token
        head = any(CONFIGS[c][1].get("lm_head") for c in args.configs)   # the LM head's input too
        stats = collect_input_stats(llm, seqs, full_seqs=16 if block else 0, gram=gram, head=head)
        print(f"# calibration statistics: {len(seqs)} sequences in {time.perf_counter() - t:.0f} s",
              flush=True)

    results = []
    for name in args.configs:
        method, extra, awq_options = CONFIGS[name]
        if method is not None:
            llm = load()
            t = time.perf_counter()
            # Sequential AWQ runs its own layer-by-layer forwards on the same sequences.
            seq = awq_options.get("sequential", False)
            quantize_llm(llm, method, args.texts if seq else [], args.split, args.calib_seqs,
                         args.calib_len, group_size=args.group_size, extra_params=extra,
                         stats=None if seq else stats, awq_options=awq_options)
            qtime = time.perf_counter() - t
        else:
            qtime = 0.0
        row = {"config": name, "quantize_s": round(qtime, 1)}
        for p, ids in evals.items():
            r = perplexity(llm, ids, args.window, args.stride)
            row[p.rsplit("/", 1)[-1]] = {"ppl": r.ppl, "tokens": r.tokens_scored}
        results.append(row)
        print(json.dumps(row), flush=True)

    base = next((r for r in results if r["config"] == "fp32"), None)
    rtn = next((r for r in results if r["config"] == "RTN-INT4 g128"), None)
    texts = [p.rsplit("/", 1)[-1] for p in args.texts]
    print("\n| config | " + " | ".join(f"{t} ppl" for t in texts)
          + " | increase over fp32 | share of RTN-INT4's increase |")
    print("| --- | " + " | ".join("---" for _ in texts) + " | --- | --- |")
    for row in results:
        inc = share = ""
        if base is not None:
            inc = " / ".join(f"{row[t]['ppl'] - base[t]['ppl']:+.3f}" for t in texts)
            if rtn is not None and row is not base:
                share = " / ".join(f"{(row[t]['ppl'] - base[t]['ppl']) / (rtn[t]['ppl'] - base[t]['ppl']):.0%}"
                                   for t in texts)
        print(f"| {row['config']} | " + " | ".join(f"{row[t]['ppl']:.3f}" for t in texts)
              + f" | {inc} | {share} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
