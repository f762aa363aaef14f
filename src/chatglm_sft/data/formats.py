"""Record files and record formats.

Files (read by `chatglm_sft.data.readers`): a JSON array, JSON Lines, or JSON objects one after another (Math23K's
test file); every record keeps the line where it starts so errors can name it. Formats turn a record into
OpenAI-style messages:

* ``alpaca``: ``instruction``, ``input``, ``output``, optional ``history`` ([[query, reply], ...]) and ``system``;
  the user turn is ``instruction`` then a newline then ``input`` (the same in training and inference);
* ``sharegpt``: ``conversations`` with ``from``/``value`` (human/gpt/system/observation/function_call...) or
  ``messages`` with ``role``/``content``;
* ``columns``: any record, with a prompt field and an optional response field (ADGEN ``content``/``summary``,
  Math23K ``original_text``/``ans``).
"""

from __future__ import annotations

from chatglm_sft.data.readers import Record, read_records  # noqa: F401  (the record files' reader)
from chatglm_sft.errors import UserError

FORMATS = ("auto", "alpaca", "sharegpt", "columns", "openai-tools", "sharegpt-tools", "chatglm3-tools", "glm4-tools")
"""The last four are the tool record formats of `chatglm_sft.data.tool_formats`."""
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "observation",
    "function_call": "assistant",
    "tool": "observation",
    "function": "observation",
}


class RecordError(ValueError):
    """A record that does not fit its format; the message says which field and why."""


def detect_format(data: dict) -> str:
    if "conversations" in data or "messages" in data:
        return "sharegpt"
    if "instruction" in data:
        return "alpaca"
    raise RecordError(
        "cannot tell the format (no instruction, conversations or messages field); "
        "pass --format, or --prompt-field for other columns"
    )


def _text_field(data: dict, key: str, required: bool = True, allow_empty: bool = False) -> str:
    if key not in data or data[key] is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, not {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _alpaca(data: dict, need_reply: bool) -> list[dict]:
    messages = []
    system = _text_field(data, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = data.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
    ):
        raise RecordError("field 'history' must be a list of [query, reply] string pairs")
    for query, reply in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
    instruction = _text_field(data, "instruction")
    extra = _text_field(data, "input", required=False)
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    if need_reply or "output" in data:
        messages.append({"role": "assistant", "content": _text_field(data, "output", required=need_reply)})
    return messages


def _sharegpt(data: dict) -> list[dict]:
    key, role_key, content_key = (
        ("conversations", "from", "value") if "conversations" in data else ("messages", "role", "content")
    )
    turns = data.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field {key!r} must be a non-empty list")
    messages = []
    system = data.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{key}[{i}] is not an object")
        source = turn.get(role_key)
        role = _SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None:
            raise RecordError(f"{key}[{i}]: unknown role {source!r}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise RecordError(f"{key}[{i}]: {content_key!r} must be a string")
        messages.append({"role": role, "content": content})
    _check_order(messages)
    return messages


def _check_order(messages: list[dict]) -> None:
    """user first (after an optional system), replies only after a user or observation turn."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    previous = None
    for i, m in enumerate(body):
        role = m["role"]
        if role == "system":
            raise RecordError(f"turn {i}: a system message may only come first")
        if i == 0 and role != "user":
            raise RecordError(f"turn {i}: the conversation must start with a user message, not {role}")
        if role == "user" and previous == "user":
            raise RecordError(f"turn {i}: two user messages in a row")
        if role == "assistant" and previous not in ("user", "observation", "assistant"):
            raise RecordError(f"turn {i}: roles out of order")
        if role == "observation" and previous != "assistant":
            raise RecordError(f"turn {i}: an observation must follow an assistant message")
        previous = role


def _columns(data: dict, prompt_field: str, response_field: str | None, need_reply: bool) -> list[dict]:
    prompt = data.get(prompt_field)
    if prompt is None:
        raise RecordError(f"missing field {prompt_field!r}")
    messages = [{"role": "user", "content": str(prompt) if not isinstance(prompt, str) else prompt}]
    if not messages[0]["content"].strip():
        raise RecordError(f"field {prompt_field!r} is empty")
    if response_field and (need_reply or response_field in data):
        reply = data.get(response_field)
        if reply is None:
            raise RecordError(f"missing field {response_field!r}")
        messages.append({"role": "assistant", "content": reply if isinstance(reply, str) else str(reply)})
    return messages


def to_messages(
    data: object,
    fmt: str = "auto",
    prompt_field: str | None = None,
    response_field: str | None = None,
    need_reply: bool = True,
) -> list[dict]:
    """A record as messages; raises `RecordError` naming the problem."""
    if not isinstance(data, dict):
        raise RecordError(f"record is not a JSON object but {type(data).__name__}")
    if fmt == "columns" or (fmt == "auto" and prompt_field):
        if not prompt_field:
            raise RecordError("the columns format needs --prompt-field")
        return _columns(data, prompt_field, response_field, need_reply)
    from chatglm_sft.data import tool_formats  # it builds on this module's RecordError

    if fmt in ("auto", "sharegpt"):  # sharegpt with tools (LLaMA-Factory, glaive) is read as a tool record
        fmt = tool_formats.detect(data) or (detect_format(data) if fmt == "auto" else fmt)
    if fmt in tool_formats.FORMATS:
        return tool_formats.to_messages(data, fmt)
    if fmt == "alpaca":
        return _alpaca(data, need_reply)
    if fmt == "sharegpt":
        return _sharegpt(data)
    raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages to generate from: everything before the last assistant reply (if the record has one)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages
