"""End to end: `ember serve` on the real SmolLM2-135M, driven by the official openai client.

One server process serves the whole module (loading the model is the slow part). It runs
with a small sequence cap and waiting queue so overload can be provoked cheaply:
--max-num-seqs 4 --max-waiting 2. Tests run in file order; the last one shuts it down.
"""
from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

KEY = "test-key"
MODEL = "smol"
MAX_BODY = 64 * 1024
PROMPT = "The capital of France is"


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", KEY)
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=60, **kw)

    def post(self, path: str, body: dict | bytes, key: str = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels dropped; one model, so no clashes)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = s.name
                if "finished_reason" in s.labels:
                    key += ":" + s.labels["finished_reason"]
                if "le" in s.labels:
                    continue
                out[key] = s.value
        return out

    def wait_metrics(self, cond, timeout: float = 20.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if cond(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf_path, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = _start_server(["--max-num-seqs", "4", "--max-waiting", "2", "--max-request-bytes", str(MAX_BODY),
                         "--shutdown-timeout", "6"], log_path)
    proc = srv.proc
    yield srv
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _idle(m: dict[str, float]) -> bool:
    return (m["ember:num_requests_running"] == 0 and m["ember:num_requests_waiting"] == 0
            and m["ember:kv_cache_usage_perc"] == 0)


# ---- the happy paths -------------------------------------------------------------------------------
def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == 512


def test_completion_stream_matches_non_stream(server):
    c = server.client()
    full = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert full.object == "text_completion"
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text.strip()
    assert full.usage.completion_tokens == 8
    assert full.usage.prompt_tokens == 5 and full.usage.total_tokens == 13
    assert full.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stream_matches_non_stream(server):
    c = server.client()
    messages = [{"role": "user", "content": "Name a color."}]
    full = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0)
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens > 10

    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 6


def test_n2_with_seed_is_reproducible(server):
    c = server.client()
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, n=2, temperature=1.0, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert sorted(ch.index for ch in a.choices) == [0, 1]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.usage.completion_tokens == 12
    # The two samples draw from different streams (seed + i): with 6 free tokens they differ.
    assert a.choices[0].text != a.choices[1].text

    chunks = list(c.completions.create(**kw, stream=True))
    streamed = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert streamed == {ch.index: ch.text for ch in a.choices}


def test_stop_string(server):
    c = server.client()
    base = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = " " + words[2]
    cut = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_completion_logprobs_and_echo(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert top[tok] == logprob
        assert logprob == max(top.values())  # greedy picks the most likely token

    e = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    lp = e.choices[0].logprobs
    assert e.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == e.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == e.choices[0].text


def test_chat_logprobs(server):
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert "".join(x.token for x in content) == r.choices[0].message.content
    for x in content:
        assert len(x.top_logprobs) == 3
        assert x.top_logprobs[0].token == x.token and x.top_logprobs[0].logprob == x.logprob
        assert [t.logprob for t in x.top_logprobs] == sorted((t.logprob for t in x.top_logprobs), reverse=True)
        assert bytes(x.bytes).decode() == x.token


def test_prefix_cache_hits_reach_usage_and_metrics(server):
    from ember.config import EngineConfig

    c = server.client()
    prompt = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry, who was a farmer, " * 3
    first = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    before = server.metrics()
    second = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    after = server.metrics()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 48
    assert cached == after["ember:prefix_cache_hits_total"] - before["ember:prefix_cache_hits_total"]
    assert after["ember:prefix_cache_queries_total"] - before["ember:prefix_cache_queries_total"] == \
        second.usage.prompt_tokens
    if EngineConfig.prefix_cache == "radix":  # the engine's default: whole 16-token blocks are reused
        assert cached >= 48 and cached % 16 == 0
        assert after["ember:prefix_cache_hit_rate"] > 0 and after["ember:prefix_cache_blocks"] >= 3
    # Blocks the cache holds for no running request are reclaimable: KV usage reads 0 when idle.
    assert after["ember:kv_cache_usage_perc"] == 0


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_requests_get_openai_errors(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hello " * 600, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=0)
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-nothing", prompt=PROMPT, max_tokens=2)
    assert e.value.param == "model"
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL, prompt="a" * (MAX_BODY + 10), max_tokens=2)
    assert e.value.status_code == 413

    # The raw shape, and errors FastAPI would answer with 422: not JSON, a wrong type.
    r = server.post("/v1/completions", b"{not json")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # A chunked body (no Content-Length) over the limit is refused too.
    r = httpx.post(server.url + "/v1/completions", content=iter([b"x" * 40_000] * 2),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413

    # ... and the server keeps serving.
    ok = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert ok.usage.completion_tokens == 2
    assert _idle(server.metrics())


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": -3}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "top_p": 1.5}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 100000}),
    ("/v1/completions", {"model": MODEL, "prompt": 42}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}),
    ("/v1/completions", b'{"model": "smol", "prompt": "\xff\xfe bad utf-8", "max_tokens": 2}'),
    ("/v1/completions", b'[1, 2, 3]'),
])
def test_bad_input_matrix(server, path, body):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    ok = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert ok.usage.completion_tokens == 1


def _start_server(extra: list[str], log_path: str) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", "smollm2-135m", "--max-model-len", "512",
           "--port", str(port), "--api-key", KEY, "--served-model-name", MODEL,
           "--uvicorn-log-level", "warning", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(proc, port, log_path)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{srv.log()}")
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{srv.log()}")
        time.sleep(0.5)


def test_32_concurrent_streaming_clients(smollm2_gguf_path, tmp_path):
    """32 clients stream at once; each gets the complete answer, equal to the greedy answer
    the same prompt gets alone."""
    srv = _start_server(["--max-num-seqs", "32", "--max-waiting", "64"], str(tmp_path / "wide.log"))
    try:
        prompts = [f"Write one sentence about the number {i}." for i in range(8)]
        c = srv.client()
        alone = {p: c.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
                 for p in prompts}

        def stream(i: int) -> tuple[str, str, str | None]:
            p = prompts[i % len(prompts)]
            text, finish = "", None
            for chunk in srv.client().completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                         temperature=0, stream=True):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return p, text, finish

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(stream, range(32)))
        assert len(results) == 32
        for p, text, finish in results:
            assert finish in ("length", "stop")
            assert text == alone[p]
        assert _idle(srv.wait_metrics(_idle))
    finally:
        srv.proc.kill()
        srv.proc.wait()


def test_full_queue_then_disconnects_free_everything(server):
    c = server.client()
    before = server.metrics()
    aborted0 = before.get("ember:request_success_total:abort", 0)
    # 4 running (--max-num-seqs 4) and 2 waiting (--max-waiting 2) fill the server.
    streams = [c.completions.create(model=MODEL, prompt=f"Story number {i}:", max_tokens=400, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True}) for i in range(6)]
    try:
        m = server.wait_metrics(lambda m: m["ember:num_requests_waiting"] == 2
                                and m["ember:num_requests_running"] == 4)
        assert (m["ember:num_requests_running"], m["ember:num_requests_waiting"]) == (4, 2)
        assert m["ember:kv_cache_usage_perc"] > 0
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "queue_full"
        # The running ones stream; read a little of the first.
        first = next(iter(streams[0]))
        assert first.choices[0].text is not None
    finally:
        for s in streams:
            s.close()
    # Closing the connections aborts all six at once (400 tokens each would take far longer).
    m = server.wait_metrics(_idle)
    assert _idle(m), m
    assert m["ember:request_success_total:abort"] - aborted0 == 6
    assert c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_non_streaming_disconnect_aborts(server):
    aborted0 = server.metrics().get("ember:request_success_total:abort", 0)
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True},
                    timeout=1.5)
    m = server.wait_metrics(lambda m: _idle(m) and m.get("ember:request_success_total:abort", 0) > aborted0)
    assert _idle(m), m
    assert m["ember:request_success_total:abort"] == aborted0 + 1


def test_metrics_content(server):
    m = server.metrics()
    assert m["ember:time_to_first_token_seconds_count"] >= 10
    assert m["ember:e2e_request_latency_seconds_count"] >= 10
    assert m["ember:time_per_output_token_seconds_count"] >= 5
    assert m["ember:time_to_first_token_seconds_sum"] > 0
    assert m["ember:prompt_tokens_total"] >= 50
    assert m["ember:generation_tokens_total"] >= 80
    assert m["ember:request_success_total:length"] >= 10
    assert m["ember:request_success_total:stop"] >= 1   # the stop-string requests
    assert m["ember:prefix_cache_hit_rate"] == pytest.approx(
        m["ember:prefix_cache_hits_total"] / m["ember:prefix_cache_queries_total"])
    assert m["ember:num_preemptions_total"] >= 0
    assert _idle(m)
    # /health and /metrics need no key; /v1 routes do.
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_bench_serve_smoke(server):
    import argparse
    import asyncio

    from ember.bench.serve import add_serve_bench_args, format_report, run

    p = argparse.ArgumentParser()
    add_serve_bench_args(p)
    args = p.parse_args(["--base-url", server.url, "--api-key", KEY, "--num-prompts", "4", "--input-len", "8",
                         "--output-len", "4", "--request-rate", "20", "--max-concurrency", "2"])
    s = asyncio.run(run(args))
    assert (s["completed"], s["failed"]) == (4, 0)
    assert s["model"] == MODEL
    assert s["total_input_tokens"] == 32 and s["total_output_tokens"] == 16
    assert 0 < s["median_ttft_ms"] <= s["p99_ttft_ms"] < s["p99_e2el_ms"]
    assert s["mean_tpot_ms"] > 0 and s["p90_itl_ms"] > 0
    report = format_report(s)
    assert "Successful requests:" in report and "P99 ITL (ms):" in report


# ---- shutdown (last: it stops the module's server) -------------------------------------------------
def test_shutdown_drains_then_aborts(server):
    """Ctrl-C: a short request in flight finishes; one that outlasts --shutdown-timeout (6 s)
    is aborted but still ends well-formed; the process exits cleanly."""
    c = server.client()
    short = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
    long = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=500, temperature=0, stream=True,
                                extra_body={"ignore_eos": True})
    short_chunks, long_chunks = iter(short), iter(long)
    texts = [next(short_chunks).choices[0].text, next(long_chunks).choices[0].text]
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    finish = [None, None]
    for i, chunks in enumerate((short_chunks, long_chunks)):
        for ch in chunks:
            texts[i] += ch.choices[0].text
            finish[i] = ch.choices[0].finish_reason or finish[i]
    assert finish == ["length", "abort"]
    assert 5.5 < time.monotonic() - start < 30
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "aborting" in log and "engine stopped" in log


def test_schemathesis_finds_no_server_errors(smollm2_gguf_path, tmp_path):
    """A bounded property-based run over the server's OpenAPI schema: no request, however
    malformed, may get a 5xx."""
    st = pytest.importorskip("schemathesis")  # noqa: F841 - the CLI below is its entry point
    srv = _start_server(["--max-model-len", "64"], str(tmp_path / "st.log"))
    try:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{srv.url}/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", "5", "--seed", "0",
               "-H", f"Authorization: Bearer {KEY}", "--request-timeout", "60"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout
    finally:
        srv.proc.kill()
        srv.proc.wait()
