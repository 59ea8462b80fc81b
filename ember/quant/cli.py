"""`ember quantize --method M --model IN --calib TEXT... --out DIR`."""
from __future__ import annotations

import argparse
import time

METHODS = ("awq", "rtn", "smoothquant", "nvfp4", "fp8")


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    from ember.cli import add_engine_args
    q = sub.add_parser("quantize", help="quantize a model and write a safetensors checkpoint")
    add_engine_args(q)
    q.add_argument("--method", required=True, choices=METHODS,
                   help="rtn = INT4 round to nearest (the AWQ format without the scale search)")
    q.add_argument("--calib", nargs="*", default=[], help="calibration text files (awq, smoothquant)")
    q.add_argument("--calib-split", type=float, default=0.8,
                   help="calibrate on the first fraction of each text (the rest is for evaluation)")
    q.add_argument("--calib-seqs", type=int, default=64)
    q.add_argument("--calib-len", type=int, default=512)
    q.add_argument("--group-size", type=int, default=128, help="INT4 group size")
    q.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    q.add_argument("--lm-head", action="store_true",
                   help="quantize the LM head too (awq: with its own scale search; a tied head gets "
                        "its own quantized copy)")
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(func=cmd_quantize)


def quantize_llm(llm, method: str, calib: list[str], calib_split: float = 0.8, calib_seqs: int = 64,
                 calib_len: int = 512, group_size: int = 128, alpha: float = 0.5,
                 extra_params: dict | None = None, stats=None, awq_options: dict | None = None):
    """Calibrate (awq, smoothquant) and quantize a full-precision LLM in place; returns its
    QuantConfig. `stats` (from collect_input_stats on the same model) skips the calibration
    forwards; `extra_params` go into the QuantConfig (e.g. nvfp4 activations="nvfp4");
    `awq_options` are apply_awq's search options (e.g. clip=True), with sequential=True
    apply_awq_sequential's (calibrating layer by layer on the quantized layers' outputs;
    it needs `calib`, not `stats`). With extra_params["lm_head"] the LM head is quantized too:
    for awq with its own scale search and clipping (awq_head; round to nearest after
    sequential AWQ, or when `stats` lacks the head's input), else round to nearest."""
    from ember.quant.base import QuantConfig
    from ember.quant.calibrate import calibration_sequences, collect_input_stats
    from ember.quant.calibrate import HEAD_STATS
    from ember.quant.checkpoint import quantize_model, untied_head
    model = llm.engine.runner.model
    awq_options = dict(awq_options or {})
    head = method == "awq" and bool((extra_params or {}).get("lm_head"))
    if method == "awq" and awq_options.pop("sequential", False):
        if not calib:
            raise ValueError("sequential AWQ needs calibration text files (it runs its own forwards)")
        from ember.quant.awq_sequential import apply_awq_sequential
        seqs = calibration_sequences(llm.get_tokenizer(), calib, calib_seqs, calib_len, calib_split)
        apply_awq_sequential(model, seqs, group_size, **awq_options)
    elif method in ("awq", "smoothquant"):
        if stats is None:
            if not calib:
                raise ValueError(f"--method {method} needs --calib text files")
            seqs = calibration_sequences(llm.get_tokenizer(), calib, calib_seqs, calib_len, calib_split)
            block = awq_options.get("loss") == "block"   # whole sequences only for it
            # AWQ's losses over every token (Gram matrices), not only the sampled rows.
            stats = collect_input_stats(llm, seqs, full_seqs=16 if block else 0, gram=method == "awq",
                                        head=head)
        if method == "awq":
            from ember.quant.awq_calibrate import apply_awq, awq_head
            apply_awq(model, stats, group_size, **awq_options)
            if head and HEAD_STATS in stats:
                untied_head(model)
                awq_head(model, stats[HEAD_STATS], group_size, awq_options.get("grid", 20),
                         awq_options.get("clip", True))
        else:
            from ember.quant.smoothquant_calibrate import apply_smoothquant
            apply_smoothquant(model, stats, alpha)
    params = {"alpha": alpha} if method == "smoothquant" else {}
    if method in ("awq", "rtn"):
        params["calibrated"] = method == "awq"
    params.update(extra_params or {})
    quant = QuantConfig("awq" if method == "rtn" else method, group_size, True, "ember", params)
    quantize_model(model, quant)
    llm.engine.model_config.quantization = quant
    return quant


def cmd_quantize(args: argparse.Namespace) -> None:
    from ember.cli import engine_kwargs
    from ember.llm import LLM
    from ember.quant.checkpoint import save_quantized
    kw = engine_kwargs(args)
    kw["quantization"] = "none"
    lm_head = kw.pop("quantize_lm_head", False) or args.lm_head   # the engine flag means the same here
    if args.method in ("awq", "smoothquant"):  # room for one calibration sequence
        kw["max_model_len"] = max(kw.get("max_model_len") or 0, args.calib_len + 1)
    t = time.perf_counter()
    llm = LLM(args.model, **kw)
    quant = quantize_llm(llm, args.method, args.calib, args.calib_split, args.calib_seqs,
                         args.calib_len, args.group_size, args.alpha,
                         extra_params={"lm_head": True} if lm_head else None)
    save_quantized(llm, quant, args.out)
    print(f"wrote {args.method} checkpoint to {args.out} in {time.perf_counter() - t:.1f} s")
