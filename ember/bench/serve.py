"""`ember bench serve`: an online serving benchmark in the manner of vLLM's.

Requests arrive as a Poisson process at --request-rate (inf: all at once), at most
--max-concurrency in flight, each streamed over SSE with httpx. Per request it measures
TTFT (time to the first streamed text), ITL (gaps between streamed chunks), TPOT
((latency - TTFT) / (output tokens - 1)) and end-to-end latency; token counts come from
the server's usage (stream_options.include_usage), so they are exact.

Prompts are synthetic (random token ids of --input-len for completions, random words for
chat) or read from --dataset-path: a .jsonl file of {"prompt": ..., "output_len"?: ...}
lines, or any text file, cut into prompts of --input-len words.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Token ids for synthetic prompts: clear of the special tokens at either end of common vocabularies.
_SYNTHETIC_IDS = (1000, 10000)
_WORDS = ("time year people way day man thing woman life child world school state family student "
          "group country problem hand part place case week company system program question work "
          "government number night point home water room mother area money story fact month lot "
          "right study book eye job word business issue side kind head house service friend father "
          "power hour game line end member law car city community name president team minute idea").split()


@dataclass
class Item:
    prompt: str | list[int]
    output_len: int


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length (tokens / words)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--dataset-path", default=None, help=".jsonl of {'prompt': ...} or a text file")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens (vLLM's ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    p.add_argument("--save-result", default=None, help="write the summary and per-request figures as JSON")


def load_items(args: argparse.Namespace) -> list[Item]:
    rng = random.Random(args.seed)
    chat = args.endpoint.endswith("chat/completions")
    if args.dataset_path is None:
        if chat:
            return [Item(" ".join(rng.choice(_WORDS) for _ in range(args.input_len)), args.output_len)
                    for _ in range(args.num_prompts)]
        return [Item([rng.randrange(*_SYNTHETIC_IDS) for _ in range(args.input_len)], args.output_len)
                for _ in range(args.num_prompts)]
    with open(args.dataset_path, encoding="utf-8") as f:
        raw = f.read()
    items: list[Item] = []
    if args.dataset_path.endswith(".jsonl"):
        for line in raw.splitlines():
            if line.strip():
                obj = json.loads(line)
                items.append(Item(obj["prompt"], int(obj.get("output_len", args.output_len))))
    else:
        words = raw.split()
        step = max(1, args.input_len)
        items = [Item(" ".join(words[i:i + step]), args.output_len)
                 for i in range(0, max(1, len(words) - step + 1), step)]
    if not items:
        raise ValueError(f"no prompts in {args.dataset_path}")
    rng.shuffle(items)
    return [items[i % len(items)] for i in range(args.num_prompts)]


def _payload(args: argparse.Namespace, model: str, item: Item) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": item.output_len, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True},
                            "ignore_eos": args.ignore_eos}
    if args.endpoint.endswith("chat/completions"):
        content = item.prompt if isinstance(item.prompt, str) else " ".join(map(str, item.prompt))
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = item.prompt
    return body


async def _one(client, args: argparse.Namespace, body: dict[str, Any]) -> Result:
    chat = args.endpoint.endswith("chat/completions")
    start = time.perf_counter()
    last = start
    res = Result(ok=False)
    first = None
    try:
        async with client.stream("POST", args.endpoint, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.ok = first is not None
    if not res.ok:
        res.error = "no text was streamed"
    return res


async def _arrivals(n: int, rate: float, rng: random.Random):
    for i in range(n):
        yield i
        if rate != math.inf and i < n - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=httpx.Timeout(None),
                                 limits=limits, trust_env=False) as client:
        model = args.model
        if model is None:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        items = load_items(args)
        # One request first: fail fast on a wrong URL, model or key, and warm the server up.
        warm = await _one(client, args, _payload(args, model, Item(items[0].prompt, min(items[0].output_len, 4))))
        if not warm.ok:
            raise SystemExit(f"ember bench serve: the warm-up request failed: {warm.error}")
        print(f"model {model}: {args.num_prompts} requests at rate {args.request_rate}/s, "
              f"max concurrency {args.max_concurrency}", file=sys.stderr)
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(item: Item) -> Result:
            if gate is None:
                return await _one(client, args, _payload(args, model, item))
            async with gate:
                return await _one(client, args, _payload(args, model, item))

        rng = random.Random(args.seed)
        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(items[i])) async for i in _arrivals(len(items), args.request_rate, rng)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def summarize(args: argparse.Namespace, model: str, results: list[Result], duration: float) -> dict[str, Any]:
    import numpy as np

    ok = [r for r in results if r.ok]
    pcts = [float(p) for p in args.percentiles.split(",") if p.strip()]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
              "e2el": [r.latency for r in ok]}
    out: dict[str, Any] = {
        "model": model, "endpoint": args.endpoint, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "num_prompts": len(results),
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
    }
    out["request_throughput"] = len(ok) / duration
    out["output_throughput"] = out["total_output_tokens"] / duration
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration
    for name, xs in series.items():
        ms = np.asarray(xs, dtype=float) * 1000.0
        out[f"mean_{name}_ms"] = float(ms.mean()) if ms.size else 0.0
        out[f"median_{name}_ms"] = float(np.median(ms)) if ms.size else 0.0
        for p in pcts:
            out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p)) if ms.size else 0.0
    out["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    out["_pcts"] = pcts
    out["_results"] = [asdict(r) for r in results]
    return out


def format_report(s: dict[str, Any]) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value:<10}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title, label in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        row(f"Mean {label} (ms):", s[f"mean_{key}_ms"])
        row(f"Median {label} (ms):", s[f"median_{key}_ms"])
        for p in s["_pcts"]:
            row(f"P{p:g} {label} (ms):", s[f"p{p:g}_{key}_ms"])
    lines.append("=" * 50)
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    try:
        import httpx  # noqa: F401
    except ImportError as e:
        raise ImportError("ember bench serve needs httpx: pip install 'ember[bench]'") from e
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0")
    summary = asyncio.run(run(args))
    print(format_report(summary))
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "_pcts"}, f, indent=1)
