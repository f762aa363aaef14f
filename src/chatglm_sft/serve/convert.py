"""Between OpenAI's shapes and ours: a validated request becomes the conversation the encoder takes; generated text
becomes the response message and the stream's deltas.

These are the only places that know how OpenAI spells a conversation; the routes call them and nothing else.
"""

from __future__ import annotations

import uuid

from chatglm_sft.families import Family
from chatglm_sft.serve.schemas import ChatRequest
from chatglm_sft.tools import parse_reply


def conversation_of(body: ChatRequest) -> list[dict]:
    """The request's messages as `encode_conversation` takes them: OpenAI's shape, tool calls and `role: "tool"`
    results included (the family's tool format maps them; a family without one refuses them)."""
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": c.function.model_dump()} for c in m.tool_calls]
        if m.function_call:
            message["function_call"] = m.function_call.model_dump()
        messages.append(message)
    return messages


def tools_of(body: ChatRequest) -> list[dict] | None:
    """The tools the prompt shows: none when there are none or `tool_choice` is "none"."""
    return body.tools if body.tools and body.tool_choice != "none" else None


def forced_call(body: ChatRequest) -> str | None:
    """The tool a reply must call: the one `tool_choice` names, or the only function for "required" (with several,
    "required" generates as "auto" does: a call's name cannot be forced without choosing it)."""
    if body.tool_choice is None or isinstance(body.tool_choice, str):
        functions = [t["function"]["name"] for t in body.tools or [] if t.get("type") == "function"]
        return functions[0] if body.tool_choice == "required" and len(functions) == 1 else None
    return body.tool_choice.function.name


def tool_response(reply: str, family: Family, tools: list[dict]) -> tuple[dict, str | None]:
    """(assistant message, finish reason when it calls tools) for a reply generated with tools: calls get ids,
    and `content` is null when the reply is only calls."""
    message, _ = parse_reply(family, reply, tools)
    if not message.get("tool_calls"):
        return message, None
    message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", **call} for call in message["tool_calls"]]
    return message, "tool_calls"


def tool_deltas(message: dict, chunk_chars: int = 16) -> list[dict]:
    """A finished tool reply as OpenAI's stream deltas: its text, then per call its id and name, then its arguments
    in pieces."""
    deltas = [{"content": message["content"]}] if message.get("content") else []
    for index, call in enumerate(message.get("tool_calls", [])):
        head = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"]}}
        deltas.append({"tool_calls": [{**head, "function": {**head["function"], "arguments": ""}}]})
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), chunk_chars):
            piece = arguments[start : start + chunk_chars]
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return deltas


def response_message(text: str, family: Family) -> dict:
    """The assistant message of a chat completion for the generated text."""
    return {"role": "assistant", "content": text}


def first_delta() -> dict:
    """The first chunk's delta of a streamed chat completion."""
    return {"role": "assistant", "content": ""}


def text_delta(text: str) -> dict:
    """A streamed chat completion's delta for newly generated text."""
    return {"content": text}
