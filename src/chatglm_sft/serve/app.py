"""The HTTP API: OpenAI-compatible chat and text completions, the seed project's `/nlg/text_generate`, health.

`create_app(engine)` builds the FastAPI app (tests run it in-process or behind uvicorn). Generation runs in the
scheduler's thread, never on the event loop; bad input gets an OpenAI-style error body with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.errors import UserError
from chatglm_sft.infer.chat import clean_response
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.serve.scheduler import Job, QueueFull, Scheduler


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param=None, code=None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "observation", "tool", "function"]
    content: StrictStr


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    seed: int | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: StrictStr


class TextGenerateRequest(BaseModel):
    """The seed project's route: an instruction, optional text, generation settings."""

    model_config = ConfigDict(extra="ignore")
    instruction: StrictStr
    text: StrictStr = ""
    max_new_tokens: int = 256
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)


def create_app(
    engine: Engine,
    model_name: str = "chatglm-sft",
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    default_max_tokens: int = 256,
) -> FastAPI:
    context = getattr(engine.model.config, "max_position_embeddings", None) or 2048
    scheduler = Scheduler(engine, max_batch_size=max_batch_size, max_queue=max_queue)
    app = FastAPI(title="chatglm-sft", version="1")
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        return error_response(400, f"{message}" + (f" ({where})" if where else ""), param=where)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "chatglm-sft"}],
        }

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def params_of(body: Sampling, prompt_tokens: int) -> SamplingParams:
        room = context - prompt_tokens
        if room <= 0:
            raise ApiError(
                400,
                f"the prompt has {prompt_tokens} tokens; this model's context is {context}",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max_tokens, room)
        if max_tokens <= 0:
            raise ApiError(400, "max_tokens must be positive", param="max_tokens")
        if max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens exceed the context of {context}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            stop=stop,
            seed=body.seed,
        )

    def chat_prompt(messages: list[Message]) -> list[int]:
        if len(" ".join(m.content for m in messages)) > 16 * context:  # far too long to be worth tokenizing
            raise ApiError(
                400,
                f"the messages are far longer than this model's context of {context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        roles = {"tool": "observation", "function": "observation"}
        plain = [{"role": roles.get(m.role, m.role), "content": m.content} for m in messages]
        try:
            return encode_conversation(engine.tokenizer, plain, add_generation_prompt=True).input_ids
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None

    def submit(prompt: list[int], params: SamplingParams) -> Job:
        try:
            return scheduler.submit(prompt, params)
        except QueueFull:
            raise ApiError(
                429,
                "the server is busy; retry shortly",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None

    async def collect(job: Job, request: Request) -> tuple[str, str]:
        parts = []
        while True:
            try:
                kind, value = await _next_event(job, request)
            except ConnectionError:
                job.cancelled = True
                raise
            if kind == "delta":
                parts.append(value)
            elif kind == "error":
                raise ApiError(500, value, "server_error")
            else:
                return "".join(parts), value

    def usage(job: Job) -> dict:
        return {
            "prompt_tokens": len(job.prompt),
            "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt) + job.completion_tokens,
        }

    def envelope(kind: str, ident: str, created: int, choice: dict, **extra) -> dict:
        """An OpenAI response object or stream chunk with its one choice."""
        return {
            "id": ident,
            "object": kind,
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, **choice}],
            **extra,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        prompt = chat_prompt(body.messages)
        job = submit(prompt, params_of(body, len(prompt)))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return sse(stream_chat(job, request, ident, created))
        text, reason = await collect(job, request)
        message = {"role": "assistant", "content": text}
        choice = {"message": message, "finish_reason": reason}
        return envelope("chat.completion", ident, created, choice, usage=usage(job))

    async def stream_chat(job: Job, request: Request, ident: str, created: int) -> AsyncIterator[dict]:
        def chunk(delta: dict, reason=None):
            return envelope("chat.completion.chunk", ident, created, {"delta": delta, "finish_reason": reason})

        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in events(job, request):
            yield chunk({"content": value}) if kind == "delta" else chunk({}, value)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if len(body.prompt) > 16 * context:
            raise ApiError(
                400,
                f"the prompt is far longer than this model's context of {context} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        prompt = engine.tokenizer.encode(body.prompt)
        job = submit(prompt, params_of(body, len(prompt)))
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:

            async def stream_text():
                async for kind, value in events(job, request):
                    text, reason = (value, None) if kind == "delta" else ("", value)
                    yield envelope("text_completion", ident, created, {"text": text, "finish_reason": reason})

            return sse(stream_text())
        text, reason = await collect(job, request)
        choice = {"text": text, "finish_reason": reason}
        return envelope("text_completion", ident, created, choice, usage=usage(job))

    @app.post("/nlg/text_generate")
    async def text_generate(body: TextGenerateRequest, request: Request):
        content = f"{body.instruction}\n{body.text}" if body.text else body.instruction
        prompt = chat_prompt([Message(role="user", content=content)])
        sampling = Sampling(
            max_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
        )
        job = submit(prompt, params_of(sampling, len(prompt)))
        text, _ = await collect(job, request)
        return {"response": clean_response(text, engine.family)}

    async def events(job: Job, request: Request) -> AsyncIterator[tuple[str, str]]:
        try:
            while True:
                kind, value = await _next_event(job, request)
                if kind == "error":
                    raise ApiError(500, value, "server_error")
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancelled = True  # no effect once finished; stops the row if the client went away

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body():
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


async def _next_event(job: Job, request: Request, poll: float = 0.5):
    """The job's next event; raises ConnectionError if the client disconnects while waiting."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=poll)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                raise ConnectionError("client disconnected") from None
