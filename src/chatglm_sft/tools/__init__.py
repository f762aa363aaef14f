"""Tool calling for the families that have it (ChatGLM3-6B, GLM-4-9B-chat): formats, parsing, evaluation helpers.

`chatglm_sft.tools.formats` maps OpenAI-style tools, calls and results to each family's messages and reads calls
back from model output; `parse_reply` is the entry point the tokenizer, the engine and the server share.
"""

from __future__ import annotations

from chatglm_sft.families import Family
from chatglm_sft.tools.formats import ROLE_SEPARATOR, TOOL_FORMATS, ToolFormat

__all__ = ["ROLE_SEPARATOR", "TOOL_FORMATS", "ToolFormat", "decode_reply", "parse_reply", "tool_format_of"]


def tool_format_of(family: Family) -> ToolFormat | None:
    """The family's tool format, or None where it has none (ChatGLM-6B, ChatGLM2-6B)."""
    return TOOL_FORMATS[family.tool_format] if family.tool_format else None


def parse_reply(family: Family, text: str, tools: list[dict] | None = None) -> tuple[dict, int]:
    """(assistant message, number of calls that were started but did not parse) for a generated reply."""
    fmt = tool_format_of(family)
    if fmt is None:
        return {"role": "assistant", "content": text.strip()}, 0
    return fmt.parse(text, tools)


def decode_reply(tokenizer, ids: list[int]) -> str:
    """Generated ids as text, with `ROLE_SEPARATOR` where the model started another assistant segment (a thought
    followed by a call), so `parse_reply` can tell the segments apart; other special tokens are dropped."""
    separator = tokenizer.family.special_tokens.get(ROLE_SEPARATOR)
    parts, part = [], []
    for token in ids:
        if token == separator:
            parts.append(part)
            part = []
        else:
            part.append(token)
    parts.append(part)
    return ROLE_SEPARATOR.join(tokenizer.decode(p, skip_special_tokens=True) for p in parts)
