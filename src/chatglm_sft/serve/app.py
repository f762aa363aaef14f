"""The HTTP server: `create_app` puts the routes, the scheduler and the guards at the edge together.

Guards, outermost first: the body-size limit (413 before the body is read), the API key (compared in constant time),
then FastAPI's validation, whose errors become OpenAI-shaped 400s. Generation runs in the scheduler's thread,
never on the event loop.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatglm_sft.infer.engine import Engine
from chatglm_sft.serve.metrics import Metrics
from chatglm_sft.serve.openapi import use_own_errors
from chatglm_sft.serve.routes import ApiError, Limits, ServerState, router
from chatglm_sft.serve.scheduler import make_scheduler

log = logging.getLogger("chatglm_sft.serve")


def create_app(
    engine: Engine,
    model_name: str = "chatglm-sft",
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    limits: Limits | None = None,
    max_body_bytes: int = 1 << 20,
    scheduler: str = "continuous",
    prefill_chunk: int = 512,
    adapters: dict[str, str] | None = None,
) -> FastAPI:
    """The app serving `engine`; `adapters` maps model ids to the LoRA adapters its PEFT model holds."""
    metrics = Metrics()
    worker = make_scheduler(
        scheduler,
        engine,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        metrics=metrics,
        prefill_chunk=prefill_chunk,
        uses_adapters=bool(adapters),
    )
    app = FastAPI(title="chatglm-sft", version="1")
    app.state.server = ServerState(engine, worker, metrics, model_name, dict(adapters or {}), limits or Limits())
    app.state.scheduler = worker
    app.include_router(router)
    _add_error_handlers(app, metrics)
    use_own_errors(app)
    if api_key:
        _require_key(app, api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes, metrics=metrics)
    return app


def error_response(status: int, message: str, kind="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        metrics.rejected.labels(status=str(e.status)).inc()
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        # FastAPI's and Starlette's own errors (an unknown path, a wrong method, a body that is not UTF-8 JSON), in
        # the same body as every other error, so that OpenAI's clients can read them.
        metrics.rejected.labels(status=str(e.status_code)).inc()
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        metrics.rejected.labels(status="400").inc()
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        return error_response(400, message + (f" ({where})" if where else ""), param=where)


def _require_key(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no timing hints about the key
                return error_response(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        return await call_next(request)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 and is never buffered — the app is not called when
    Content-Length says so, or as soon as the bytes read pass it (a body without a length is read here, at most
    `limit` bytes, and passed on)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit and more:
                return await self._too_large(scope, receive, send)
            if size > self.limit:
                return await self._too_large(scope, _nothing_more, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        """413, after reading (and dropping) what the client still sends: a server that answers and closes while
        the client is still sending resets the connection, and the client never sees the answer."""
        self.metrics.rejected.labels(status="413").inc()
        dropped, more = 0, True
        while more and dropped < _DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)
        message = f"request body is larger than this server's limit of {self.limit} bytes"
        headers = {"Connection": "close"} if more else None
        await error_response(413, message, code="request_too_large", headers=headers)(scope, receive, send)


async def _nothing_more():
    return {"type": "http.request", "body": b"", "more_body": False}


_DRAIN_LIMIT = 64 << 20
"""Past this many bytes of an oversize body, answer 413 and close the connection without reading on."""
