"""Between OpenAI's shapes and ours: a validated request becomes the conversation the encoder takes; generated text
becomes the response message and the stream's deltas.

These are the only places that know how OpenAI spells a conversation; the routes call them and nothing else.
"""

from __future__ import annotations

from chatglm_sft.families import Family
from chatglm_sft.serve.schemas import ChatRequest

_ROLES = {"tool": "observation", "function": "observation"}
"""OpenAI's roles for tool results are ChatGLM's `observation`."""


def conversation_of(body: ChatRequest) -> list[dict]:
    """The request's messages as `encode_conversation` takes them."""
    return [{"role": _ROLES.get(m.role, m.role), "content": m.text()} for m in body.messages]


def response_message(text: str, family: Family) -> dict:
    """The assistant message of a chat completion for the generated text."""
    return {"role": "assistant", "content": text}


def first_delta() -> dict:
    """The first chunk's delta of a streamed chat completion."""
    return {"role": "assistant", "content": ""}


def text_delta(text: str) -> dict:
    """A streamed chat completion's delta for newly generated text."""
    return {"content": text}
