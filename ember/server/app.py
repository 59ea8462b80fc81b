"""The FastAPI application: OpenAI's completions and chat completions, /v1/models,
/health and /metrics, over an AsyncEngine."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.engine.engine import PromptTooLongError
from ember.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ember.sampling_params import SamplingParams
from ember.server import protocol as P
from ember.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    OutputStream,
    QueueFullError,
)
from ember.server.cli import DEFAULT_MAX_BODY_BYTES
from ember.server.metrics import CONTENT_TYPE

logger = logging.getLogger("ember.server")


# ---- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        info = P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return P.ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _engine_error(e: BaseException, param: str) -> APIError:
    """Map what adding a request can raise to the status a client should see."""
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_overloaded", None, "queue_full", {"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "server_error", None, "engine_unavailable")
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, P.BadRequest):
        return APIError(400, str(e), param=e.param or param)
    if isinstance(e, ValueError):
        return APIError(400, str(e), param=param)
    raise e


# ---- ASGI middleware --------------------------------------------------------------------------
async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/ routes (health and metrics stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await _send_error(send, APIError(401, "invalid or missing API key",
                                                 code="invalid_api_key"))
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 to a body over `max_bytes`, declared or streamed, before the app reads it.

    The body is read here, then replayed to the app; later receives go to the server, so
    the app still hears `http.disconnect`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_big = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                           code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, too_big)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)


class _EventStream(StreamingResponse):
    """Server-sent events that abort the engine requests behind them however they end
    (finished, client gone, server shutting down)."""

    def __init__(self, content: AsyncIterator[str], stream: OutputStream) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


def _sse(obj: Any) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


# ---- per-request state ----------------------------------------------------------------------------
@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _ChoiceState:
    """What a stream has already sent for one choice."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False


def _usage(finals: list[RequestOutput]) -> P.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))


def _finish(c: CompletionOutput) -> tuple[str | None, int | str | None]:
    return c.finish_reason, c.stop_reason


class _Server:
    """Route handlers, sharing the engine, the tokenizer and the served names."""

    def __init__(self, engine: AsyncEngine, served_model_names: list[str], model_path: str) -> None:
        self.engine = engine
        self.names = served_model_names
        self.model_path = model_path
        self.tokenizer = engine.engine.tokenizer

    # ---- helpers ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        if model is None or model == "":
            return self.names[0]
        if model not in self.names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self.names)}", param="model",
                           code="model_not_found")
        return model

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise P.BadRequest("this model has no tokenizer: send prompts as token ids", "prompt")
        return self.tokenizer

    def _decode_one(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _off_loop(self, fn: Callable[[], Any]) -> Any:
        """Tokenizing and template rendering run in a worker thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn)

    async def _submit(self, prefix: str, prompts: list[_Prompt], params: SamplingParams, arrival: float,
                      param: str) -> OutputStream:
        """Queue one engine request per prompt; on any refusal, abort those already queued."""
        stream = self.engine.open_stream()
        # All at once: each add waits for the engine thread to finish its current step.
        adds = [stream.add(f"{prefix}-{i}", p.token_ids, params, p.text, arrival) for i, p in enumerate(prompts)]
        try:
            results = await asyncio.gather(*adds, return_exceptions=True)
        except BaseException:
            stream.close()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            stream.close()
            if isinstance(errors[0], Exception):
                raise _engine_error(errors[0], param) from errors[0]
            raise errors[0]
        return stream

    @staticmethod
    async def _collect(stream: OutputStream, request: Request) -> dict[str, RequestOutput] | None:
        """Wait for every request of the stream to finish; None if the client went away first
        (the requests are then aborted and their KV blocks freed)."""
        finals: dict[str, RequestOutput] = {}

        async def consume() -> None:
            async for out in stream:
                if out.finished:
                    finals[out.request_id] = out

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async with stream:
            work = asyncio.ensure_future(consume())
            watch = asyncio.ensure_future(disconnected())
            try:
                await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                if not work.done():
                    work.cancel()
            if not work.done() or work.cancelled():
                return None
            try:
                work.result()
            except EngineDeadError as e:
                raise _engine_error(e, "") from e
            return finals

    # ---- /v1/completions ------------------------------------------------------------------------
    def _encode_completion_prompts(self, req: P.CompletionRequest) -> list[_Prompt]:
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append(_Prompt(p, self._need_tokenizer().encode(p)))
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                text = self.tokenizer.decode(p, skip_special_tokens=False) if req.echo and self.tokenizer else None
                out.append(_Prompt(text, list(p)))
            else:
                raise P.BadRequest("prompt must be a string, a list of strings, a list of token ids "
                                   "or a list of token-id lists, not a mix", "prompt")
        return out

    def _completion_logprobs(self, token_ids: list[int], entries: list[PositionLogprobs | None],
                             offset: int) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for tid, pos in zip(token_ids, entries):
            if pos is None or tid not in pos:   # the first prompt token has no context
                token = self._decode_one(tid)
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                token = pos[tid].decoded_token or ""
                lp.token_logprobs.append(pos[tid].logprob)
                lp.top_logprobs.append({(p.decoded_token or ""): p.logprob for p in
                                        sorted(pos.values(), key=lambda p: p.rank or 0)})
            lp.tokens.append(token)
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    def _completion_choice_delta(self, req: P.CompletionRequest, out: RequestOutput, c: CompletionOutput,
                                 st: _ChoiceState) -> tuple[str, P.CompletionLogprobs | None]:
        """The text and logprobs of one choice not yet sent (everything, when non-streaming)."""
        text = c.text[st.text_len:] if len(c.text) > st.text_len else ""
        st.text_len = max(st.text_len, len(c.text))
        logprobs = None
        if req.logprobs is not None:
            ids, entries = c.token_ids[st.num_tokens:], (c.logprobs or [])[st.num_tokens:]
            logprobs = P.CompletionLogprobs()
            if req.echo and not st.started:
                logprobs = self._completion_logprobs(out.prompt_token_ids,
                                                     out.prompt_logprobs or [None] * len(out.prompt_token_ids),
                                                     st.text_offset)
                st.text_offset += sum(len(t) for t in logprobs.tokens)
            gen = self._completion_logprobs(ids, entries, st.text_offset)
            st.text_offset += sum(len(t) for t in gen.tokens)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, name).extend(getattr(gen, name))
        st.num_tokens = len(c.token_ids)
        if req.echo and not st.started:
            text = (out.prompt or "") + text
        st.started = True
        return text, logprobs

    async def completions(self, req: P.CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self.check_model(req.model)
        try:
            params = req.to_sampling_params()
            prompts = await self._off_loop(lambda: self._encode_completion_prompts(req))
        except P.BadRequest as e:
            raise _engine_error(e, "prompt") from e
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._submit(rid, prompts, params, arrival, "prompt")
        if req.stream:
            return _EventStream(self._stream_completions(req, rid, model, stream, params.n, len(prompts)), stream)
        by_id = await self._collect(stream, request)
        if by_id is None:
            return Response(status_code=499)
        finals = [by_id[f"{rid}-{i}"] for i in range(len(prompts))]
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                text, logprobs = self._completion_choice_delta(req, out, c, _ChoiceState())
                reason, stop_reason = _finish(c)
                choices.append(P.CompletionChoice(index=i * params.n + c.index, text=text, logprobs=logprobs,
                                                  finish_reason=reason, stop_reason=stop_reason))
        return JSONResponse(P.CompletionResponse(id=rid, model=model, choices=choices,
                                                 usage=_usage(finals)).model_dump())

    async def _stream_completions(self, req: P.CompletionRequest, rid: str, model: str,
                                  stream: OutputStream, n: int, num_prompts: int) -> AsyncIterator[str]:
        created = int(time.time())
        index_of = {f"{rid}-{i}": i for i in range(num_prompts)}
        states: dict[int, _ChoiceState] = {}
        finals: dict[str, RequestOutput] = {}
        usage_null = req.include_usage
        try:
            async for out in stream:
                for c in out.outputs:
                    idx = index_of[out.request_id] * n + c.index
                    st = states.setdefault(idx, _ChoiceState())
                    if st.done:
                        continue
                    text, logprobs = self._completion_choice_delta(req, out, c, st)
                    reason, stop_reason = _finish(c)
                    if not text and reason is None and not (logprobs and logprobs.tokens):
                        continue
                    st.done = reason is not None
                    chunk = P.CompletionResponse(
                        id=rid, created=created, model=model,
                        choices=[P.CompletionChoice(index=idx, text=text, logprobs=logprobs,
                                                    finish_reason=reason, stop_reason=stop_reason)])
                    yield _sse(chunk if usage_null else chunk.model_dump(exclude={"usage"}))
                if out.finished:
                    finals[out.request_id] = out
            if req.include_usage:
                yield _sse(P.CompletionResponse(id=rid, created=created, model=model, choices=[],
                                                usage=_usage([finals[r] for r in sorted(finals, key=index_of.get)])))
        except EngineDeadError as e:
            yield _sse(APIError(503, str(e), "server_error").body())
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    def _encode_chat(self, req: P.ChatCompletionRequest) -> _Prompt:
        tok = self._need_tokenizer()
        try:
            text = tok.apply_chat_template(req.conversation(), add_generation_prompt=req.add_generation_prompt,
                                           tokenize=False, **(req.chat_template_kwargs or {}))
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            if isinstance(e, P.BadRequest):
                raise
            raise P.BadRequest(f"cannot apply the chat template: {e}", "messages") from e
        # The template already holds the special tokens it wants (e.g. a BOS).
        return _Prompt(text, tok.encode(text, add_special_tokens=False))

    def _chat_logprobs(self, token_ids: list[int], entries: list[PositionLogprobs], k: int) -> P.ChatLogprobs:
        content = []
        for tid, pos in zip(token_ids, entries):
            chosen = pos[tid]
            top = sorted((p for p in pos.values() if p.rank is not None and p.rank <= k), key=lambda p: p.rank)
            token = chosen.decoded_token or ""
            content.append(P.ChatLogprobEntry(
                token=token, logprob=chosen.logprob, bytes=list(token.encode()),
                top_logprobs=[P.TopLogprob(token=p.decoded_token or "", logprob=p.logprob,
                                           bytes=list((p.decoded_token or "").encode())) for p in top[:k]]))
        return P.ChatLogprobs(content=content)

    def _chat_delta(self, req: P.ChatCompletionRequest, c: CompletionOutput,
                    st: _ChoiceState) -> tuple[str, P.ChatLogprobs | None]:
        text = c.text[st.text_len:] if len(c.text) > st.text_len else ""
        st.text_len = max(st.text_len, len(c.text))
        logprobs = None
        if req.logprobs:
            logprobs = self._chat_logprobs(c.token_ids[st.num_tokens:], (c.logprobs or [])[st.num_tokens:],
                                           req.top_logprobs or 0)
        st.num_tokens = len(c.token_ids)
        return text, logprobs

    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self.check_model(req.model)
        try:
            params = req.to_sampling_params()
            prompt = await self._off_loop(lambda: self._encode_chat(req))
        except P.BadRequest as e:
            raise _engine_error(e, "messages") from e
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._submit(rid, [prompt], params, arrival, "messages")
        if req.stream:
            return _EventStream(self._stream_chat(req, rid, model, stream), stream)
        by_id = await self._collect(stream, request)
        if by_id is None:
            return Response(status_code=499)
        finals = list(by_id.values())
        choices = []
        for c in finals[0].outputs:
            text, logprobs = self._chat_delta(req, c, _ChoiceState())
            reason, stop_reason = _finish(c)
            choices.append(P.ChatChoice(index=c.index, message=P.ChatMessageOut(content=text),
                                        logprobs=logprobs, finish_reason=reason, stop_reason=stop_reason))
        return JSONResponse(P.ChatCompletionResponse(id=rid, model=model, choices=choices,
                                                     usage=_usage(finals)).model_dump())

    async def _stream_chat(self, req: P.ChatCompletionRequest, rid: str, model: str,
                           stream: OutputStream) -> AsyncIterator[str]:
        created = int(time.time())
        states: dict[int, _ChoiceState] = {}
        final: RequestOutput | None = None

        def chunk(choice: P.ChatStreamChoice) -> str:
            c = P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])
            return _sse(c if req.include_usage else c.model_dump(exclude={"usage"}))

        try:
            # OpenAI opens every choice with the assistant role and empty content.
            for i in range(req.n):
                yield chunk(P.ChatStreamChoice(index=i, delta=P.DeltaMessage(role="assistant", content="")))
            async for out in stream:
                for c in out.outputs:
                    st = states.setdefault(c.index, _ChoiceState())
                    if st.done:
                        continue
                    text, logprobs = self._chat_delta(req, c, st)
                    reason, stop_reason = _finish(c)
                    if not text and reason is None and not (logprobs and logprobs.content):
                        continue
                    st.done = reason is not None
                    yield chunk(P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(content=text or None),
                                                   logprobs=logprobs, finish_reason=reason,
                                                   stop_reason=stop_reason))
                if out.finished:
                    final = out
            if req.include_usage and final is not None:
                yield _sse(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                                 usage=_usage([final])))
        except EngineDeadError as e:
            yield _sse(APIError(503, str(e), "server_error").body())
        yield "data: [DONE]\n\n"

    # ---- the rest -------------------------------------------------------------------------------------
    def models(self) -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=name, root=self.model_path,
                                             max_model_len=self.engine.engine.max_model_len)
                                 for name in self.names])


def build_app(engine: AsyncEngine, served_model_names: list[str], model_path: str,
              api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine thread and, at shutdown, aborts what is
    still running (uvicorn first lets in-flight requests finish, up to its graceful timeout)."""
    if not served_model_names:
        raise ValueError("at least one served model name is needed")
    server = _Server(engine, served_model_names, model_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="ember", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # outermost: checked first

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{err.get('msg')}" for err in errors[:5])
        return APIError(400, message or "invalid request", param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                        else "server_error").response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, f"internal server error: {type(e).__name__}", "server_error").response()

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        return await server.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(req, request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(server.models().model_dump())

    @app.get("/health")
    async def health() -> Response:
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return APIError(503, "the engine is not running", "server_error").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    return app
