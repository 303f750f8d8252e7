"""The HTTP side of `edgelm serve`: OpenAI's /v1 routes and llama-server's /health, /tokenize, /detokenize,
/slots, on FastAPI (request bodies validated by pydantic models; served by uvicorn; streams as server-sent
events by sse-starlette — the stack llama-cpp-python's server uses).

Each request becomes a Job for the Engine (engine.py); the engine's thread hands events back to the request's
asyncio queue. A client that goes away cancels its job: a stream when sse-starlette sees the disconnect, a
non-streamed request when the wait for its next event notices it.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import render_ids
from ..chat_template import template_for
from ..errors import EdgeLMError
from .engine import Done, Engine, Failed, Job, Piece, QueueFull
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, Reply, TokenizeRequest, error_body

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ServerConfig:
    def __init__(self, api_key: str | None = None, max_body: int = 4 << 20, model_id: str | None = None,
                 loopback_only: bool = True, max_tokens: int | None = None, chat_template: str | None = None):
        self.api_key = api_key
        self.max_body = max_body                  # bytes of a request body
        self.model_id = model_id
        self.loopback_only = loopback_only        # refuse Host headers that are not loopback (DNS rebinding)
        self.max_tokens = max_tokens              # cap on a request's max_tokens (None: the context)
        self.chat_template = chat_template


def create_app(model, engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    cfg = config or ServerConfig()
    model_id = cfg.model_id or os.path.basename(model.path)
    template = template_for(model.gguf.metadata, model.tokenizer, cfg.chat_template)
    try:                                 # a broken or hostile template: said once at start, then 400 per request
        render_ids(model, template, [{"role": "user", "content": "Hello"}])
    except EdgeLMError as e:
        log.warning(f"{e}: /v1/chat/completions will refuse requests (completions work)")
    tok = model.tokenizer
    app = FastAPI(title="edgelm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    # -- errors in OpenAI's shape, one line each --------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _error(400, _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(EdgeLMError)
    async def _edgelm(request, exc: EdgeLMError):
        return _error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc: QueueFull):
        return _error(503, f"server busy: {exc}; retry later", "server_error", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.error("%s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    app.add_middleware(_Guard, cfg=cfg)

    # -- routes -----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.status()}

    @app.get("/slots")
    async def slots():
        return engine.slot_info()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model, model_id)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_id:
            return _error(404, f"model {name!r} is not served here (this server has {model_id!r})",
                          "not_found_error", code="model_not_found")
        return _model_card(model, model_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ids = await run_in_threadpool(model.tokenize, body.content, body.add_special, body.parse_special)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.token_bytes(i, special=True).decode("utf-8", "replace")}
                               for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < tok.n_vocab]
        if bad:
            raise EdgeLMError(f"tokens: id {bad[0]} is outside the vocabulary (0..{tok.n_vocab - 1})")
        return {"content": tok.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(body: ChatRequest, request: Request):
        if body.tools:
            raise EdgeLMError("tools: tool calling is not supported by this server")
        messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        ids = await run_in_threadpool(render_ids, model, template, messages)
        return await _respond(request, body, ids, Reply("chat", model_id, tok), body.limit(), body.n_logprobs(),
                              echo="")

    @app.post("/v1/completions")
    @app.post("/completions", include_in_schema=False)
    async def completions(body: CompletionRequest, request: Request):
        if body.suffix:
            raise EdgeLMError("suffix: insertion (fill-in-the-middle) is not supported")
        prompt = body.one_prompt()
        if isinstance(prompt, str):
            ids = await run_in_threadpool(model.tokenize, prompt, True, False)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < tok.n_vocab]
            if bad:
                raise EdgeLMError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{tok.n_vocab - 1})")
        echo = (prompt if isinstance(prompt, str) else tok.decode(ids)) if body.echo else ""
        return await _respond(request, body, ids, Reply("text", model_id, tok), body.max_tokens, body.logprobs,
                              echo)

    async def _respond(request: Request, body, ids: list[int], reply: Reply, limit: int | None,
                       n_logprobs: int | None, echo: str):
        n_ctx = model.n_ctx
        if len(ids) >= n_ctx:
            return _error(400, f"the prompt is {len(ids)} tokens, the context holds {n_ctx} (with room for at "
                               f"least one generated token)", code="context_length_exceeded")
        room = n_ctx - len(ids)
        max_tokens = min(limit or room, room, cfg.max_tokens or room)
        params = model.sampling_defaults.with_(**body.sampling())      # EdgeLMError: a one-line 400
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):                                 # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:                      # the loop is gone (shutdown)
                pass

        job = Job(ids, max_tokens, params, body.stops(), emit, n_logprobs)
        engine.submit(job)
        watcher = asyncio.ensure_future(_watch_disconnect(request, job))
        if body.stream:
            return StreamingResponse(_stream(job, events, reply, body.include_usage, echo, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _collect(job, events, reply, echo)
        finally:
            watcher.cancel()
            job.cancel()           # no-op once done; stops the job if this coroutine was cancelled

    async def _collect(job: Job, events: asyncio.Queue, reply: Reply, echo: str):
        parts, tokens = [echo], ([] if job.n_logprobs is not None else None)
        while True:
            ev = await events.get()
            if isinstance(ev, Piece):
                parts.append(ev.text)
                if tokens is not None:
                    tokens.extend(ev.tokens)
            elif isinstance(ev, Done):
                return reply.final("".join(parts), tokens, ev)
            elif isinstance(ev, Failed):
                return _error(500, ev.message, "server_error")
            elif ev is _GONE:
                return _error(499, "client closed the request")

    async def _stream(job: Job, events: asyncio.Queue, reply: Reply, include_usage: bool, echo: str, watcher):
        """Server-sent events: `data: {chunk}` per piece, `data: [DONE]` at the end. Starlette's
        StreamingResponse cancels this generator when the client disconnects; the job is then cancelled."""
        try:
            if reply.kind == "chat":
                yield _event(reply.chunk(None, first=True))
            elif echo:
                yield _event(reply.chunk(echo))
            logprobs = job.n_logprobs is not None
            while True:
                out = []
                ev = await events.get()
                while True:              # what else is already queued goes out in the same write
                    if isinstance(ev, Piece):
                        if logprobs:
                            out.append(_event(reply.chunk(ev.text, ev.tokens)))
                        elif ev.text:
                            out.append(reply.text_event(ev.text))
                    elif isinstance(ev, Done):
                        out.append(_event(reply.chunk(None, finish=ev.finish_reason)))
                        if include_usage:
                            out.append(_event(reply.usage_chunk(ev)))
                        out.append("data: [DONE]\n\n")
                        break
                    elif isinstance(ev, Failed):
                        out.append(_event(error_body(ev.message, "server_error")))
                        out.append("data: [DONE]\n\n")
                        break
                    elif ev is _GONE:
                        return
                    if events.empty():
                        break
                    ev = events.get_nowait()
                yield "".join(out)
                if isinstance(ev, (Done, Failed)):
                    return
        finally:
            watcher.cancel()
            job.cancel()           # the client went away mid-stream: stop generating

    return app


_GONE = object()     # put in a request's event queue when its client disconnects


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Wait for the client's disconnect (the body was already read, so the next ASGI message is that) and
    cancel the job: a client that leaves while its request waits, while its prompt is evaluated or while it
    streams stops the work at the engine's next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            job.emit(_GONE)
            return


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _model_card(model, model_id: str) -> dict:
    try:
        created = int(os.path.getmtime(model.path))
    except OSError:
        created = 0
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgelm",
            "meta": {"n_ctx": model.n_ctx, "n_ctx_train": model.config.n_ctx_train, "n_vocab": model.config.n_vocab,
                     "n_params": model.n_params, "arch": model.config.arch}}


def _error(status: int, message: str, type_: str = "invalid_request_error", code=None, headers=None):
    return JSONResponse(error_body(" ".join(message.split()), type_, code), status_code=status, headers=headers)


def _validation_message(errors) -> str:
    """pydantic's errors as one line: where (the field path) and the rule."""
    if not errors:
        return "invalid request body"
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
    msg = e.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}"


class _Guard:
    """Plain ASGI middleware in front of every route: the Host header (a loopback server answers loopback
    names only, so a web page cannot reach it by DNS rebinding), the API key (every route but /health), and the
    body size (read here, bounded, then handed on)."""

    def __init__(self, app, cfg: ServerConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.cfg.loopback_only and _host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
            return await _send(send, 400, "invalid Host header: this server answers loopback names only "
                                          "(start it with --host to serve other names)")
        if self.cfg.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            want = f"Bearer {self.cfg.api_key}"
            if not hmac.compare_digest(given.encode(), want.encode()):
                return await _send(send, 401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                   code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cfg.max_body):
            return await _send(send, 413, f"request body larger than the {self.cfg.max_body} bytes allowed")
        body, more = [], True
        size = 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body:
                return await _send(send, 413, f"request body larger than the {self.cfg.max_body} bytes allowed")
            body.append(chunk)
            more = msg.get("more_body", False)
        data = b"".join(body)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()            # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


def _host_name(host: str) -> str:
    if host.startswith("["):                  # [::1]:8080
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send(send, status: int, message: str, code=None) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
