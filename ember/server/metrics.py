"""Prometheus metrics for `/metrics`, named like vLLM's (with an `ember:` prefix).

Two sources feed them:
- per-request latencies and token counts, recorded by the engine thread as requests
  progress (so a request counts even when its client has gone);
- engine state (queue lengths, KV usage, preemptions, prefix-cache stats), read at scrape
  time from a snapshot the engine thread publishes after every step, never from the
  engine itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)


@dataclass
class RequestTiming:
    """What the metrics remember about one request while it runs (engine thread only)."""

    arrival: float                 # time.monotonic() when the HTTP request arrived
    first_token: float | None = None
    counted_tokens: int = 0        # generated tokens already added to the counter
    prompt_counted: bool = False


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state after a step, published by the engine thread (replaced, never mutated)."""

    num_running: int = 0         # sequences being decoded or prefilled
    num_waiting: int = 0         # sequences queued (new or preempted)
    kv_cache_usage: float = 0.0  # 1 - free blocks / blocks (cached blocks no request uses count as free)
    num_preemptions: int = 0
    prefix_cache_queries: int = 0   # prompt tokens of admitted requests
    prefix_cache_hits: int = 0      # of those, served from the prefix cache
    prefix_cache_blocks: int = 0    # blocks the prefix cache holds now
    spec_num_drafts: int = 0        # speculative verifications (request-steps with drafts)
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self._snapshot = snapshot
        self._model = model_name

    def collect(self) -> Iterator:
        s = self._snapshot()
        labels = ["model_name"]
        for name, doc, value in (
            ("ember:num_requests_running", "Sequences in the running batch.", s.num_running),
            ("ember:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("ember:kv_cache_usage_perc", "Fraction of KV cache blocks in use by requests (1 = full).",
             s.kv_cache_usage),
            ("ember:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
             s.prefix_cache_hit_rate),
            ("ember:prefix_cache_blocks", "KV blocks the prefix cache holds.", s.prefix_cache_blocks),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], value)
            yield g
        for name, doc, value in (
            ("ember:num_preemptions", "Sequences preempted (KV cache full).", s.num_preemptions),
            ("ember:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("ember:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("ember:spec_decode_num_drafts", "Speculative verifications (a request's drafts in one step).",
             s.spec_num_drafts),
            ("ember:spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_num_draft_tokens),
            ("ember:spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_num_accepted_tokens),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self._model], value)
            yield c


class ServerMetrics:
    """The server's metrics in their own registry (several servers may share a process)."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        r = self.registry
        self.ttft = Histogram("ember:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("ember:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              labels, buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("ember:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("ember:prompt_tokens", "Prompt tokens prefilled.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("ember:generation_tokens", "Generated tokens (aborted requests' too).",
                                         labels, registry=r).labels(model_name)
        self._success = Counter("ember:request_success", "Finished requests, by finish reason.",
                                labels + ["finished_reason"], registry=r)
        r.register(_EngineCollector(snapshot, model_name))

    # ---- called by the engine thread --------------------------------------------------------
    def observe(self, out: RequestOutput, t: RequestTiming, now: float) -> None:
        """Account for a request's newest output (cumulative) at time `now`."""
        n_out = [len(c.token_ids) for c in out.outputs]
        new_tokens = sum(n_out) - t.counted_tokens
        if new_tokens > 0:
            self.generation_tokens.inc(new_tokens)
            t.counted_tokens += new_tokens
        if t.first_token is None and new_tokens > 0:
            t.first_token = now
            self.ttft.observe(now - t.arrival)
        if not t.prompt_counted and (t.first_token is not None or out.finished):
            # The prompt has been prefilled (or the request ended before it was).
            t.prompt_counted = True
            self.prompt_tokens.inc(len(out.prompt_token_ids))
        if not out.finished:
            return
        reasons = {c.finish_reason or "abort" for c in out.outputs}
        reason = "abort" if "abort" in reasons else ("length" if reasons == {"length"} else "stop")
        self._success.labels(self.model_name, reason).inc()
        if reason == "abort":
            return
        self.e2e.observe(now - t.arrival)
        longest = max(n_out, default=0)
        if t.first_token is not None and longest > 1:
            self.tpot.observe((now - t.first_token) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
