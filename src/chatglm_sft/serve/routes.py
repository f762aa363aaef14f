"""The HTTP routes: OpenAI-compatible chat and text completions, models, the seed project's `/nlg/text_generate`,
health and Prometheus metrics.

A request is validated (schemas), converted (convert), tokenized in a worker thread, checked against the server's
limits, and handed to the scheduler; its results come back as events. A client that leaves — streaming or not — is
noticed while its request decodes, and its row leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.errors import UserError
from chatglm_sft.infer.chat import clean_response
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.serve import convert
from chatglm_sft.serve.metrics import Metrics
from chatglm_sft.serve.openapi import error_responses
from chatglm_sft.serve.scheduler import Job, QueueFull, Scheduler
from chatglm_sft.serve.schemas import ChatRequest, CompletionRequest, SamplingFields, TextGenerateRequest
from chatglm_sft.tools import decode_reply

router = APIRouter()

STREAMED = {
    200: {
        "description": "JSON, or with `stream: true` server-sent events: one JSON chunk each, then `[DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}},
    }
}
GENERATION_RESPONSES = STREAMED | error_responses(400, 401, 404, 413, 429, 500)


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens_limit: int = 4096
    """Most new tokens per request."""
    max_prompt_tokens: int | None = None
    """Most prompt tokens per request (None: the model's context)."""
    default_max_tokens: int = 256
    """New tokens when a request names none (cut to what the context leaves)."""


@dataclass
class ServerState:
    """Everything the routes need, kept on `app.state.server`."""

    engine: Engine
    scheduler: Scheduler
    metrics: Metrics
    model_name: str
    """The base model's id."""
    adapters: dict[str, str]
    """Model id of each LoRA adapter served beside it -> its name in the PEFT model."""
    limits: Limits

    @property
    def context(self) -> int:
        return getattr(self.engine.model.config, "max_position_embeddings", None) or 2048


def server_of(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": server_of(request).model_name}


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))
async def metrics(request: Request):
    return Response(server_of(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", responses=error_responses(401))
async def models(request: Request):
    server = server_of(request)
    ids = [server.model_name, *server.adapters]
    data = [{"id": i, "object": "model", "created": 0, "owned_by": "chatglm-sft"} for i in ids]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request):
    server = server_of(request)
    adapter = adapter_for(server, body.model)
    family, tools, forced = server.engine.family, convert.tools_of(body), convert.forced_call(body)
    if body.tools and family.tool_format is None:
        reason = f"{family.name} has no tool-calling format (tools work with ChatGLM3 and GLM-4)"
        raise ApiError(400, reason, param="tools")
    # A forced call: the assistant turn starts with its header (the tool name line), and the model writes the rest.
    header = server.engine.tokenizer.encode_plain(f"{forced}\n") if forced and tools else []
    conversation = convert.conversation_of(body)
    prompt = await tokenize(server, lambda: chat_ids(server, conversation, tools) + header, "messages")
    job = submit(server, "chatcmpl", prompt, params_of(server, body, len(prompt)), adapter, body.model)
    if tools:
        return await tool_reply(server, job, request, body, header)
    if body.stream:

        def chunk(delta: dict, reason=None) -> dict:
            return envelope(server, job, "chat.completion.chunk", {"delta": delta, "finish_reason": reason})

        async def chunks() -> AsyncIterator[dict]:
            yield chunk(convert.first_delta())
            async for kind, value in events(job):
                yield chunk(convert.text_delta(value)) if kind == "delta" else chunk({}, value)
            if body.include_usage:
                yield envelope(server, job, "chat.completion.chunk", None, usage=usage(job))

        return sse(job, request, chunks())
    text, reason = await collect(job, request)
    choice = {"message": convert.response_message(text, server.engine.family), "finish_reason": reason}
    return envelope(server, job, "chat.completion", choice, usage=usage(job))


async def tool_reply(server: ServerState, job: Job, request: Request, body: ChatRequest, header: list[int]):
    """A reply generated with tools: read whole (a call is only known to be one once it is complete), then answered
    as a message with `tool_calls`, or streamed as OpenAI's deltas (text, then each call's name and arguments)."""

    def message_of(reason: str) -> tuple[dict, str]:
        reply = decode_reply(server.engine.tokenizer, header + job.token_ids)
        message, called = convert.tool_response(reply, server.engine.family, body.tools)
        return message, called or reason

    if not body.stream:
        message, reason = message_of((await collect(job, request))[1])
        choice = {"message": message, "finish_reason": reason}
        return envelope(server, job, "chat.completion", choice, usage=usage(job))

    async def chunks() -> AsyncIterator[dict]:
        def chunk(delta: dict, reason=None) -> dict:
            return envelope(server, job, "chat.completion.chunk", {"delta": delta, "finish_reason": reason})

        yield chunk(convert.first_delta())
        done = [value async for kind, value in events(job) if kind == "done"]
        message, reason = message_of(done[-1])
        for delta in convert.tool_deltas(message):
            yield chunk(delta)
        yield chunk({}, reason)
        if body.include_usage:
            yield envelope(server, job, "chat.completion.chunk", None, usage=usage(job))

    return sse(job, request, chunks())


@router.post("/v1/completions", responses=GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    server = server_of(request)
    adapter = adapter_for(server, body.model)
    prompt = await tokenize(server, lambda: server.engine.tokenizer.encode(body.prompt), "prompt")
    job = submit(server, "cmpl", prompt, params_of(server, body, len(prompt)), adapter, body.model)
    if body.stream:

        async def chunks() -> AsyncIterator[dict]:
            async for kind, value in events(job):
                text, reason = (value, None) if kind == "delta" else ("", value)
                yield envelope(server, job, "text_completion", {"text": text, "finish_reason": reason})
            if body.include_usage:
                yield envelope(server, job, "text_completion", None, usage=usage(job))

        return sse(job, request, chunks())
    text, reason = await collect(job, request)
    return envelope(server, job, "text_completion", {"text": text, "finish_reason": reason}, usage=usage(job))


@router.post("/nlg/text_generate", responses=error_responses(400, 401, 413, 429, 500))
async def text_generate(body: TextGenerateRequest, request: Request):
    server = server_of(request)
    content = f"{body.instruction}\n{body.text}" if body.text else body.instruction
    prompt = await tokenize(server, lambda: chat_ids(server, [{"role": "user", "content": content}]), "instruction")
    sampling = body.as_sampling()
    job = submit(server, "nlg", prompt, params_of(server, sampling, len(prompt)), None, None)
    text, _ = await collect(job, request)
    return {"response": clean_response(text, server.engine.family)}


# --- from a validated request to a job -------------------------------------------------------------------------------


def adapter_for(server: ServerState, name: str | None) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base model); unknown names are 404."""
    if name is None or name == server.model_name:
        return None
    if name in server.adapters:
        return server.adapters[name]
    served = ", ".join(repr(m) for m in (server.model_name, *server.adapters))
    message = f"model {name!r} does not exist; this server serves {served}"
    raise ApiError(404, message, param="model", code="model_not_found")


def chat_ids(server: ServerState, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
    tokenizer = server.engine.tokenizer
    return encode_conversation(tokenizer, conversation, add_generation_prompt=True, tools=tools).input_ids


async def tokenize(server: ServerState, encode, param: str) -> list[int]:
    """Token ids of a prompt, computed in a worker thread so that long prompts never stall other streams."""
    try:
        ids = await run_in_threadpool(encode)
    except UserError as e:
        raise ApiError(400, str(e), param=param) from None
    limit = min(server.limits.max_prompt_tokens or server.context, server.context - 1)
    if len(ids) > limit:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this server takes at most {limit}",
            param=param,
            code="context_length_exceeded",
        )
    return ids


def params_of(server: ServerState, body: SamplingFields, prompt_tokens: int) -> SamplingParams:
    """The request's sampling settings, its token budget checked against the limit and the context."""
    room = server.context - prompt_tokens
    requested = body.requested_tokens
    limit = server.limits.max_tokens_limit
    if requested is not None and requested > limit:
        raise ApiError(400, f"max_tokens {requested} is above this server's limit of {limit}", param="max_tokens")
    if requested is not None and requested > room:
        raise ApiError(
            400,
            f"max_tokens {requested} plus the prompt's {prompt_tokens} tokens exceed the context of {server.context}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            max_new_tokens=requested if requested is not None else min(server.limits.default_max_tokens, room, limit),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop_strings(),
            seed=body.seed,
        )
    except UserError as e:  # the rules SamplingParams checks itself
        raise ApiError(400, str(e)) from None


def submit(server, prefix: str, prompt: list[int], params: SamplingParams, adapter, model) -> Job:
    job = Job(
        id=f"{prefix}-{uuid.uuid4().hex[:24]}",
        prompt=prompt,
        params=params,
        loop=asyncio.get_running_loop(),
        adapter=adapter,
        model=model or server.model_name,
    )
    try:
        return server.scheduler.submit(job)
    except QueueFull:
        busy = "the server is busy; retry shortly"
        raise ApiError(429, busy, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None


# --- from a job's events to a response -------------------------------------------------------------------------------


@asynccontextmanager
async def watching(job: Job, request: Request):
    """Cancel the job as soon as the client disconnects, and when the response ends for any reason."""

    async def watch():
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a connection the server reports broken: the client is gone too
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        job.cancel()  # no effect once the job finished


async def events(job: Job) -> AsyncIterator[tuple[str, str]]:
    """("delta", text) events, then ("done", finish_reason); an engine failure is a 500 (or ends the stream)."""
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            raise ApiError(500, f"generation failed ({value}); request id {job.id}", "server_error")
        yield kind, value
        if kind == "done":
            return


async def collect(job: Job, request: Request) -> tuple[str, str]:
    parts = []
    async with watching(job, request):
        async for kind, value in events(job):
            if kind == "delta":
                parts.append(value)
            else:
                return "".join(parts), value
    raise AssertionError("unreachable: events end with done")


def sse(job: Job, request: Request, chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async with watching(job, request):
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except ApiError as e:  # headers are sent: the error goes in the stream, as OpenAI does
                error = {"error": {"message": e.message, "type": e.kind, "param": None, "code": e.code}}
                yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
                return
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"x-request-id": job.id})


def usage(job: Job) -> dict:
    prompt, completion = len(job.prompt), job.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(server: ServerState, job: Job, kind: str, choice: dict | None, **extra) -> dict:
    """An OpenAI response object or stream chunk with its one choice (none: the usage chunk)."""
    return {
        "id": job.id,
        "object": kind,
        "created": int(job.created),
        "model": job.model,
        "choices": [] if choice is None else [{"index": 0, **choice}],
        **extra,
    }
