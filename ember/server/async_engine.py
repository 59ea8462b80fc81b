"""Runs the Engine's step loop in its own thread and feeds asyncio consumers.

Threading model:
- The engine thread is the only one that touches the Engine: it takes commands (add,
  abort, stop) from a queue, steps while there is work, and blocks on the queue when idle.
  So the Engine needs no locks.
- The event loop owns the `OutputStream`s. The engine thread hands each step's outputs
  over with `loop.call_soon_threadsafe` and never waits for a consumer.
- Outputs are cumulative, so a stream keeps only the newest output of each request: a
  slow client costs one pending object per request, never a growing queue.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ember.engine.engine import Engine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.metrics import EngineSnapshot, RequestTiming, ServerMetrics

logger = logging.getLogger("ember.server")


class QueueFullError(RuntimeError):
    """The waiting queue holds --max-waiting sequences already."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or crashed)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival: float                 # time.monotonic() when the HTTP request arrived
    future: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    pass


@dataclass
class _Stop:
    pass


class OutputStream:
    """The outputs of one HTTP request's engine requests (one per prompt).

    Lives on the event loop. Iterate it for the newest cumulative output of whichever
    requests changed; it ends when all of them have finished. Leaving it (`async with`,
    or `close()`) aborts the ones still running.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._latest: dict[str, RequestOutput] = {}
        self._unfinished: set[str] = set()
        self._event = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  prompt: str | None = None, arrival: float | None = None) -> None:
        """Queue one engine request; raises what Engine.add_request raises, or QueueFullError."""
        self._unfinished.add(request_id)
        try:
            await self._engine._add(self, request_id, prompt_token_ids, params, prompt,
                                    time.monotonic() if arrival is None else arrival)
        except BaseException:
            self._unfinished.discard(request_id)
            raise

    def _put(self, out: RequestOutput) -> None:
        self._latest[out.request_id] = out
        if out.finished:
            self._unfinished.discard(out.request_id)
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            await self._event.wait()
            self._event.clear()
            if self._error is not None:
                raise self._error
            ready, self._latest = self._latest, {}
            for out in ready.values():
                yield out
            if not self._unfinished:
                return

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        """Abort whatever is still running (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for rid in list(self._unfinished):
            self._engine.abort(rid)
        self._unfinished.clear()

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncEngine:
    """An Engine behind a command queue, driven by a dedicated thread."""

    def __init__(self, engine: Engine, metrics_name: str, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self.snapshot = EngineSnapshot()
        self.metrics = ServerMetrics(metrics_name, lambda: self.snapshot)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}   # event-loop side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None       # set when the engine thread crashed

    # ---- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is already running")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def open_stream(self) -> OutputStream:
        return OutputStream(self)

    async def _add(self, stream: OutputStream, request_id: str, prompt_token_ids: list[int],
                   params: SamplingParams, prompt: str | None, arrival: float) -> None:
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        future = self._loop.create_future()
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt_token_ids, params, prompt, arrival, future))
        try:
            await future
        except BaseException as e:
            self._streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):
                self.abort(request_id)  # the engine thread may have added it already
            raise

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request (thread-safe, never blocks)."""
        self._commands.put(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every unfinished request (thread-safe); their streams end with finish_reason
        "abort". Used when a graceful shutdown runs out of time."""
        self._commands.put(_AbortAll())

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running, then end the engine thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("the engine thread did not stop within %.0f s", timeout)
        else:
            logger.info("engine stopped")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in set(streams.values()):
            stream._fail(error)

    @staticmethod
    def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        timings: dict[str, RequestTiming] = {}
        try:
            while True:
                idle = not engine.has_unfinished_requests()
                stop = self._drain_commands(timings, block=idle)
                if stop:
                    self._abort_all(timings)
                    return
                outputs = engine.step() if engine.has_unfinished_requests() else []
                self._record(outputs, timings)
                # Publish before delivering: a client that sees its request finish must not
                # then read stale gauges from /metrics.
                self._publish()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as e:  # a crashed engine must not leave clients hanging
            logger.exception("the engine thread crashed")
            self.error = e
            self._stopping = True
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine crashed: {e!r}"))
            self._drain_failed()

    def _drain_commands(self, timings: dict[str, RequestTiming], block: bool) -> bool:
        """Run queued commands; True when asked to stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return False
            block = False
            if isinstance(cmd, _Stop):
                return True
            if isinstance(cmd, _AbortAll):
                self._abort_all(timings)
                continue
            if isinstance(cmd, _Abort):
                out = self.engine.abort_request(cmd.request_id)
                if out is not None:
                    self._record([out], timings)
                    self._publish()
                    self._loop.call_soon_threadsafe(self._deliver, [out])
                continue
            self._loop.call_soon_threadsafe(self._resolve, cmd.future, self._try_add(cmd, timings))

    def _try_add(self, cmd: _Add, timings: dict[str, RequestTiming]) -> BaseException | None:
        if cmd.future.cancelled():
            return None  # the client left before its request reached the engine
        if self.max_waiting is not None:
            sched = self.engine.scheduler
            # Waiting sequences that the next step cannot admit for lack of a running slot
            # (so a burst that arrives between two steps is not refused while slots are free).
            queued = len(sched.waiting) - max(0, sched.max_num_seqs - len(sched.running))
            if queued >= self.max_waiting:
                return QueueFullError(f"the server is overloaded: {queued} sequences are queued "
                                      f"(--max-waiting {self.max_waiting}); retry later")
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, prompt=cmd.prompt)
        except ValueError as e:  # PromptTooLongError is a ValueError
            return e
        timings[cmd.request_id] = RequestTiming(cmd.arrival)
        return None

    def _record(self, outputs: list[RequestOutput], timings: dict[str, RequestTiming]) -> None:
        now = time.monotonic()
        for out in outputs:
            t = timings.get(out.request_id)
            if t is None:
                continue
            self.metrics.observe(out, t, now)
            if out.finished:
                del timings[out.request_id]

    def _abort_all(self, timings: dict[str, RequestTiming]) -> None:
        outputs = [out for rid in list(timings) if (out := self.engine.abort_request(rid)) is not None]
        self._record(outputs, timings)
        self._publish()
        self._loop.call_soon_threadsafe(self._deliver, outputs)
        logger.info("%d unfinished requests aborted", len(outputs))

    def _drain_failed(self) -> None:
        """After a crash: refuse whatever add commands are still queued."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._loop.call_soon_threadsafe(self._resolve, cmd.future,
                                                EngineDeadError("the engine is not running"))

    def _publish(self) -> None:
        e = self.engine
        pool = e.block_pool
        # An engine with a prefix cache reports its stats; cached blocks that no request
        # uses are reclaimable, so they count as free (as in vLLM).
        stats = e.prefix_cache.stats() if getattr(e, "prefix_cache", None) is not None else None
        evictable = getattr(stats, "evictable_blocks", 0)
        self.snapshot = EngineSnapshot(
            num_running=len(e.scheduler.running),
            num_waiting=len(e.scheduler.waiting),
            kv_cache_usage=1.0 - (pool.num_free + evictable) / pool.num_blocks,
            num_preemptions=e.scheduler.num_preemptions,
            prefix_cache_queries=getattr(stats, "prompt_tokens", 0),
            prefix_cache_hits=getattr(stats, "cached_prompt_tokens", 0),
            prefix_cache_blocks=getattr(stats, "cached_blocks", 0),
            **self._spec_counters())

    def _spec_counters(self) -> dict[str, int]:
        speculator = getattr(self.engine, "speculator", None)
        if speculator is None:
            return {}
        st = speculator.stats
        return dict(spec_num_drafts=st.num_verifications, spec_num_draft_tokens=st.num_draft_tokens,
                    spec_num_accepted_tokens=st.num_accepted_tokens)
