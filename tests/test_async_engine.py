"""AsyncEngine against a scripted fake Engine: no model, so these run in well under a second.

The fake produces one token per running request per step; a gate lets a test hold the
engine thread between steps.
"""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")

from ember.engine.engine import PromptTooLongError  # noqa: E402
from ember.outputs import CompletionOutput, RequestOutput  # noqa: E402
from ember.sampling_params import SamplingParams  # noqa: E402
from ember.server.async_engine import AsyncEngine, EngineDeadError, QueueFullError  # noqa: E402


class FakeEngine:
    def __init__(self, max_num_seqs: int = 2, fail_at_step: int | None = None) -> None:
        self.scheduler = SimpleNamespace(waiting=[], running=[], max_num_seqs=max_num_seqs, num_preemptions=0)
        self.block_pool = SimpleNamespace(num_free=8, num_blocks=8)
        self.tokenizer = None
        self.reqs: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.gate = threading.Event()     # step() waits on it
        self.gate.set()
        self.entered = threading.Event()  # set when step() starts
        self.thread_ids: set[int] = set()

    def add_request(self, rid: str, ids: list[int], params: SamplingParams, prompt: str | None = None) -> None:
        self.thread_ids.add(threading.get_ident())
        if len(ids) > 8:
            raise PromptTooLongError("too long")
        self.reqs[rid] = (ids, params, [])
        self.scheduler.waiting.append(rid)
        self.block_pool.num_free -= 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def _out(self, rid: str, reason: str | None) -> RequestOutput:
        ids, _, toks = self.reqs[rid]
        return RequestOutput(rid, None, ids, [CompletionOutput(0, "", list(toks), finish_reason=reason)],
                             finished=reason is not None)

    def _drop(self, rid: str) -> None:
        for q in (self.scheduler.waiting, self.scheduler.running):
            if rid in q:
                q.remove(rid)
        self.block_pool.num_free += 1

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.entered.set()
        self.gate.wait()
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("boom")
        s = self.scheduler
        while s.waiting and len(s.running) < s.max_num_seqs:
            s.running.append(s.waiting.pop(0))
        outs = []
        for rid in list(s.running):
            _, params, toks = self.reqs[rid]
            toks.append(len(toks))
            done = len(toks) >= params.max_tokens
            outs.append(self._out(rid, "length" if done else None))
            if done:
                self._drop(rid)
        return outs

    def abort_request(self, rid: str) -> RequestOutput | None:
        self.thread_ids.add(threading.get_ident())
        if rid not in self.scheduler.waiting and rid not in self.scheduler.running:
            return None
        self.aborted.append(rid)
        self._drop(rid)
        return self._out(rid, "abort")


def _run(coro_fn, fake: FakeEngine, max_waiting: int | None = None):
    async def main():
        engine = AsyncEngine(fake, "fake", max_waiting)
        engine.start()
        try:
            return await asyncio.wait_for(coro_fn(engine), timeout=10)
        finally:
            await engine.stop()
    return asyncio.run(main())


def test_outputs_reach_the_stream_and_the_engine_is_only_touched_by_its_thread():
    fake = FakeEngine()

    async def go(engine: AsyncEngine):
        async with engine.open_stream() as s:
            await s.add("a", [1, 2], SamplingParams(max_tokens=5))
            seen = [out async for out in s]
        return seen

    seen = _run(go, fake)
    assert seen[-1].finished and seen[-1].outputs[0].token_ids == [0, 1, 2, 3, 4]
    assert all(len(a.outputs[0].token_ids) < len(b.outputs[0].token_ids) for a, b in zip(seen, seen[1:]))
    assert len(fake.thread_ids) == 1 and threading.get_ident() not in fake.thread_ids
    assert fake.block_pool.num_free == 8


def test_a_slow_consumer_gets_only_the_newest_output():
    fake = FakeEngine()

    async def go(engine: AsyncEngine):
        s = engine.open_stream()
        await s.add("a", [1], SamplingParams(max_tokens=40))
        while fake.steps < 40:      # the engine runs on while nobody reads
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)   # let the last hand-over land
        return [out async for out in s]

    seen = _run(go, fake)
    assert len(seen) == 1 and len(seen[0].outputs[0].token_ids) == 40 and seen[0].finished


def test_closing_a_stream_aborts_and_frees():
    fake = FakeEngine()

    async def go(engine: AsyncEngine):
        async with engine.open_stream() as s:
            await s.add("a", [1], SamplingParams(max_tokens=10_000))
            async for out in s:
                if len(out.outputs[0].token_ids) >= 3:
                    break
        for _ in range(100):
            if engine.snapshot.kv_cache_usage == 0:
                break
            await asyncio.sleep(0.01)
        return engine.snapshot

    snap = _run(go, fake)
    assert fake.aborted == ["a"]
    assert snap.num_running == 0 and snap.kv_cache_usage == 0


def test_add_errors_and_a_full_queue_are_raised_to_the_caller():
    fake = FakeEngine(max_num_seqs=1)

    async def go(engine: AsyncEngine):
        s = engine.open_stream()
        with pytest.raises(PromptTooLongError):
            await s.add("long", list(range(20)), SamplingParams())
        await s.add("a", [1], SamplingParams(max_tokens=10_000))   # takes the only running slot
        # Hold the engine inside a step so that b and c reach it in one batch of commands.
        fake.gate.clear()
        fake.entered.clear()
        while not fake.entered.is_set():
            await asyncio.sleep(0.005)
        b = asyncio.ensure_future(s.add("b", [1], SamplingParams(max_tokens=10_000)))
        c = asyncio.ensure_future(s.add("c", [1], SamplingParams()))
        await asyncio.sleep(0.05)
        fake.gate.set()
        await b                                                    # b waits: max_waiting=1 reached
        with pytest.raises(QueueFullError):
            await c
        s.close()

    _run(go, fake, max_waiting=1)
    assert "long" not in fake.reqs and "c" not in fake.reqs
    assert sorted(fake.aborted) == ["a", "b"]


def test_an_engine_crash_fails_waiting_clients_and_refuses_new_ones():
    fake = FakeEngine(fail_at_step=3)

    async def go(engine: AsyncEngine):
        s = engine.open_stream()
        await s.add("a", [1], SamplingParams(max_tokens=100))
        with pytest.raises(EngineDeadError):
            async for _ in s:
                pass
        assert not engine.alive and isinstance(engine.error, RuntimeError)
        with pytest.raises(EngineDeadError):
            await engine.open_stream().add("b", [1], SamplingParams())

    _run(go, fake)


def test_stop_aborts_what_is_still_running():
    fake = FakeEngine()

    async def go(engine: AsyncEngine):
        s = engine.open_stream()
        await s.add("a", [1], SamplingParams(max_tokens=10_000))
        while fake.steps < 2:
            await asyncio.sleep(0.01)
        await engine.stop()
        return [out async for out in s]

    seen = _run(go, fake)
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert fake.aborted == ["a"]
