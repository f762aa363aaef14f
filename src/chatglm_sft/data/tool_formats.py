"""Training records with tools, in the four shapes people have them, as one thing: OpenAI-style messages.

* ``openai-tools``: ``{"messages": [...], "tools": [...]}`` with assistant ``tool_calls`` and ``role: "tool"``
  results (and, as THUDM's GLM-4 fine-tuning writes them, a system message carrying ``tools``, ``observation``
  turns and calls as assistant ``metadata`` + JSON arguments: ``glm4-tools`` is the same reader);
* ``sharegpt-tools``: LLaMA-Factory / glaive sharegpt, ``conversations`` of ``from``/``value`` with
  ``function_call`` and ``observation`` turns and ``tools`` as a JSON string;
* ``chatglm3-tools``: THUDM's ChatGLM3 tool fine-tuning records, ``tools`` + ``conversations`` whose
  ``role: "tool"`` items carry ``name``, ``parameters`` and ``observation``.

Every reader checks what a tool record can get wrong (tools that are not a list of functions, a call to a tool
not among them, arguments that are not a JSON object, a result without a call before it) and raises `RecordError`
naming it. The messages keep per-message ``"loss": false``; record tools become a leading system message carrying
them, which each family's tool format renders its own way (`chatglm_sft.tools.formats`).
"""

from __future__ import annotations

import json

from chatglm_sft.conversation import ROLES
from chatglm_sft.data.formats import RecordError
from chatglm_sft.tools.formats import TOOL_ROLES

FORMATS = ("openai-tools", "sharegpt-tools", "chatglm3-tools", "glm4-tools")
_BUILTIN_TOOLS = ("python", "simple_browser", "cogview")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SHAREGPT_RESULTS = ("observation", "tool", "function")


def detect(data: dict) -> str | None:
    """The tool record format of `data`, or None when it has no tools, calls or results (a plain record)."""
    turns = data.get("conversations")
    if isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns):
        if all("role" in t for t in turns):
            return "chatglm3-tools"
        if "tools" in data or any(t.get("from") in ("function_call", *_SHAREGPT_RESULTS) for t in turns):
            return "sharegpt-tools"
        return None
    messages = data.get("messages")
    if isinstance(messages, list) and ("tools" in data or any(_has_tool_parts(m) for m in messages)):
        return "openai-tools"
    return None


def _has_tool_parts(m: object) -> bool:
    return isinstance(m, dict) and (
        any(key in m for key in ("tools", "tool_calls", "function_call", "metadata", "loss"))
        or m.get("role") in ("tool", "function", "observation")
    )


def to_messages(data: dict, fmt: str) -> list[dict]:
    """A tool record as OpenAI-style messages (record tools first, as a system message carrying them)."""
    readers = {
        "openai-tools": _openai,
        "glm4-tools": _openai,
        "sharegpt-tools": _sharegpt,
        "chatglm3-tools": _chatglm3,
    }
    messages = readers[fmt](data)
    check_tool_use(messages)
    return messages


_ROLES = (*ROLES, *TOOL_ROLES)
"""Roles a tool record's messages may have (tool and function results are read as observations)."""


def _check_message(m: dict, where: str) -> None:
    """A known role and text content (a tool or function result may be any JSON, which is written as JSON; a missing
    content is empty): the checks the encoder makes, made here too, so that `data check` without --model and
    preference pairs refuse what training would, naming the record's own field."""
    role, content = m.get("role"), m.get("content")
    if role not in _ROLES:
        raise RecordError(f"{where}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
    if role not in TOOL_ROLES and content is not None and not isinstance(content, str):
        raise RecordError(f"{where}: content must be a string")
    if "loss" in m and not isinstance(m["loss"], bool):
        raise RecordError(f"{where}: loss must be true or false")


# --- tools -----------------------------------------------------------------------------------------------------------


def check_tools(tools: object, where: str = "tools") -> list[dict]:
    """Tools as a list of OpenAI function entries; ChatGLM3's plain ``{name, description, parameters}`` are wrapped."""
    if isinstance(tools, str):  # sharegpt keeps them as JSON text
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise RecordError(f"{where} is not valid JSON ({e.msg})") from None
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RecordError(f"{where} must be a list of functions, not {type(tools).__name__}")
    checked = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            function = tool["function"]
        elif isinstance(tool, dict) and tool.get("type") in _BUILTIN_TOOLS:
            checked.append(tool)
            continue
        elif isinstance(tool, dict) and "type" not in tool:
            function, tool = tool, {"type": "function", "function": tool}
        else:
            raise RecordError(f"{where}[{i}] is not a function (expected {{type: function, function: {{name, ...}}}})")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{where}[{i}] has no function name")
        checked.append(tool)
    return checked


def _tools_message(tools: list[dict]) -> list[dict]:
    return [{"role": "system", "content": "", "tools": tools}] if tools else []


def _names(tools: list[dict]) -> set[str]:
    return {t["function"]["name"] if t["type"] == "function" else t["type"] for t in tools}


# --- the three readers ----------------------------------------------------------------------------------------------


def _turns(data: dict, key: str) -> list:
    turns = data.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field {key!r} must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{key}[{i}] is not an object")
    return turns


def _openai(data: dict) -> list[dict]:
    messages = _tools_message(check_tools(data.get("tools")))
    for i, m in enumerate(_turns(data, "messages")):
        _check_message(m, f"messages[{i}]")
        m = dict(m)
        if m.get("role") == "system" and m.get("tools") is not None:
            m["tools"] = _without_null_properties(check_tools(m["tools"], f"messages[{i}].tools"))
        else:
            m.pop("tools", None)  # THUDM's GLM-4 fine-tuning ignores tools anywhere but on a system message
        if m.get("role") == "assistant" and m.get("metadata") and not m.get("tool_calls"):
            # GLM-4's own form of a call: the tool name as metadata, the JSON arguments as content
            if not isinstance(m["metadata"], str):
                raise RecordError(f"messages[{i}]: metadata (the called tool's name) must be a string")
            m["tool_calls"] = [
                {"type": "function", "function": {"name": m.pop("metadata"), "arguments": m.get("content")}}
            ]
            m["content"] = None
        messages.append(m)
    return messages


def _without_null_properties(tools: list[dict]) -> list[dict]:
    """THUDM's `process_message`: properties whose schema is null are dropped (top level of `properties` only)."""
    out = []
    for tool in tools:
        parameters = (tool.get("function") or {}).get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if isinstance(properties, dict) and any(v is None for v in properties.values()):
            function = dict(tool["function"])
            function["parameters"] = {
                **function["parameters"],
                "properties": {k: v for k, v in properties.items() if v is not None},
            }
            tool = {**tool, "function": function}
        out.append(tool)
    return out


def _sharegpt(data: dict) -> list[dict]:
    messages = _tools_message(check_tools(data.get("tools")))
    system = data.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(_turns(data, "conversations")):
        source, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise RecordError(f"conversations[{i}]: 'value' must be a string")
        if source == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": _sharegpt_calls(i, value)})
        elif source in _SHAREGPT_RESULTS:
            messages.append({"role": "tool", "content": value})
        elif isinstance(source, str) and source in _SHAREGPT_ROLES:
            messages.append({"role": _SHAREGPT_ROLES[source], "content": value})
        else:
            raise RecordError(f"conversations[{i}]: unknown role {source!r}")
    return messages


def _sharegpt_calls(i: int, value: str) -> list[dict]:
    """A function_call turn: ``{"name", "arguments"}`` as JSON text, or a list of them (parallel calls)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordError(f"conversations[{i}]: function_call is not valid JSON ({e.msg})") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RecordError(f"conversations[{i}]: function_call must be {{name, arguments}}")
        out.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
    return out


def _chatglm3(data: dict) -> list[dict]:
    messages = _tools_message(check_tools(data.get("tools")))
    for i, item in enumerate(_turns(data, "conversations")):
        loss = {"loss": item["loss"]} if "loss" in item else {}
        if item.get("role") != "tool":
            _check_message(item, f"conversations[{i}]")
            messages.append({"role": item.get("role"), "content": item.get("content"), **loss})
            continue
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise RecordError(f"conversations[{i}]: a tool item needs a 'name'")
        call = {"type": "function", "function": {"name": item["name"], "arguments": item.get("parameters")}}
        observation = item.get("observation")
        if not isinstance(observation, str):  # THUDM dumps anything else as JSON (a missing one as null)
            observation = json.dumps(observation, ensure_ascii=False)
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call], **loss},
            {"role": "tool", "content": observation},
        ]
    return messages


# --- what every tool record must get right ---------------------------------------------------------------------------


def check_tool_use(messages: list[dict]) -> None:
    """Calls name known tools with JSON-object arguments; every result answers a call made before it."""
    known: set[str] | None = None
    pending = 0
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "system" and m.get("tools") is not None:
            known = (known or set()) | _names(m["tools"])
        elif role in ("tool", "function", "observation"):
            if pending == 0:
                raise RecordError(f"message {i}: a tool result without a call before it")
            pending -= 1
        elif role == "assistant":
            calls = _calls(i, m)
            for name in calls:
                if known is None:
                    raise RecordError(f"message {i}: a call to {name!r} but the record has no tools")
                if name not in known:
                    raise RecordError(f"message {i}: a call to {name!r}, which is not among the tools")
            pending = pending + len(calls) if calls else 0
        elif role == "user":
            pending = 0


def _calls(i: int, m: dict) -> list[str]:
    """The tool names an assistant message calls (THUDM's README writes a call as JSON content: it counts too)."""
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RecordError(f"message {i}: tool_calls must be a list")
    names = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(f"message {i}: a tool call needs a function with a name")
        _check_arguments(i, function["name"], function.get("arguments"))
        names.append(function["name"])
    if not names and isinstance(m.get("content"), str) and m["content"].lstrip().startswith("{"):
        try:
            written = json.loads(m["content"])
        except json.JSONDecodeError:
            return names
        if isinstance(written, dict) and isinstance(written.get("name"), str) and "arguments" in written:
            _check_arguments(i, written["name"], written["arguments"])
            names.append(written["name"])
    return names


def _check_arguments(i: int, name: str, arguments: object) -> None:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise RecordError(f"message {i}: the arguments of {name!r} are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise RecordError(f"message {i}: the arguments of {name!r} are not a JSON object")


def check_ending(messages: list[dict]) -> None:
    """A training conversation ends with a non-empty assistant reply, or (with tools) a call or its result after
    something learned; anything else leaves nothing to train on."""
    last = messages[-1]
    if last.get("role") in ("tool", "function", "observation") or (
        last.get("role") == "assistant" and last.get("tool_calls")
    ):
        if not any(m.get("role") == "assistant" and m.get("loss", True) for m in messages):
            raise RecordError("no assistant message to learn")
        return
    if last.get("role") != "assistant":
        raise RecordError("the conversation does not end with an assistant reply to learn")
    if not isinstance(last.get("content"), str) or not last["content"].strip():
        raise RecordError("the last assistant reply is empty")
