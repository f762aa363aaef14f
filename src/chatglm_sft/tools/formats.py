"""Tool formats: how ChatGLM3-6B and GLM-4-9B-chat see tools, calls and results, and how their calls are read back.

A family's record names its `ToolFormat` (`Family.tool_format`). The format maps an OpenAI-style conversation
(``tools``, assistant ``tool_calls``, ``role: "tool"`` results) to the family's own messages, the ones its chat
template renders (``system``/``user``/``assistant``/``observation`` with a ``metadata`` header), as
``reference/tools/FORMATS.md`` section 6 defines it:

* tools become the first message, a system message carrying them (ChatGLM3: its fixed sentence and the tools JSON
  unwrapped to ``{name, description, parameters}``; GLM-4: its template's tools block, tools as sent);
* a caller's system messages stay where they are, once;
* ``tool`` (and the legacy ``function``) results become ``observation`` messages;
* an assistant message with calls becomes its text (a "thought", when there is any) and then one assistant message
  per call, the tool name as metadata (ChatGLM3: a ``tool_call(...)`` code fence; GLM-4: the arguments JSON).

Family messages pass through unchanged (``observation``, ``metadata``, a system message carrying ``tools``), so
THUDM's own fine-tuning records need no conversion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatglm_sft.errors import UserError
from chatglm_sft.tools.pycall import format_tool_call, read_tool_call

ROLE_SEPARATOR = "<|assistant|>"
"""A reply may hold several assistant segments (a thought, then a call); decoded replies keep this between them."""

CHATGLM3_TOOLS_SENTENCE = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_TOOLS_HEADER = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_FUNCTION_FOOTER = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
# The fixed descriptions GLM-4's template writes for its built-in tools (rendered with trim_blocks: one newline
# before each "##").
GLM4_BUILTIN_TOOLS = {
    "python": (
        "\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，"
        "该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
        "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
        "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` "
        "进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    ),
    "simple_browser": (
        "\n## simple_browser\n\n你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` "
        "参数控制搜索内容的时效性。\n"
        "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，"
        "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
        "`open_url(url: str)`：打开指定的 URL。\n\n使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
        "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
        " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    ),
    "cogview": (
        "\n## cogview\n\n如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
        "你需要向 `cogview` 发送图像描述，规则：\n"
        "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
        "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
    ),
}

TOOL_ROLES = ("tool", "function")
_NAME = re.compile(r"\S+")


def _dumps(value: object) -> str:
    return json.dumps(value, indent=4, ensure_ascii=False)


def tool_name(tool: object) -> str | None:
    """The name a call uses for a tool entry: OpenAI ``function.name``, ChatGLM3's ``name``, or a built-in type."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    if tool.get("type") == "function" and isinstance(function, dict):
        return function.get("name")
    return tool.get("name") or tool.get("type")


def check_tools(tools: object) -> list:
    """`tools` as a list (None and [] are no tools); anything else is a `UserError`."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise UserError(f"tools must be a list of tool objects, not {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise UserError(f"tools[{i}] is not an object")
    return tools


def arguments_object(arguments: object, where: str) -> dict:
    """A call's arguments as a dict: a JSON object, given as text (OpenAI) or already parsed."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: arguments are not valid JSON ({e.msg})") from None
    if not isinstance(arguments, dict):
        raise UserError(f"{where}: arguments must be a JSON object")
    return arguments


def result_text(content: object) -> str:
    """A tool result as the observation's text: strings as they are, text parts joined, other JSON dumped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return json.dumps(content, ensure_ascii=False)


# --- per-family pieces ----------------------------------------------------------------------------------------------


def _chatglm3_tools_messages(content: str, tools: list) -> list[dict]:
    # The model was trained on {name, description, parameters} lists: OpenAI wrappers are taken off.
    plain = [
        t["function"] if isinstance(t.get("function"), dict) and t.get("type") == "function" else t for t in tools
    ]
    return [{"role": "system", "content": f"{content or CHATGLM3_TOOLS_SENTENCE}\n{_dumps(plain)}"}]


def _glm4_tools_messages(content: str, tools: list) -> list[dict]:
    block = GLM4_TOOLS_HEADER
    for tool in tools:
        if tool.get("type") == "function":
            function = tool.get("function") or {}
            block += f"\n## {function.get('name')}\n\n{_dumps(function)}{GLM4_FUNCTION_FOOTER}"
        else:
            block += GLM4_BUILTIN_TOOLS.get(tool.get("type"), "")
    extra = [{"role": "system", "content": content}] if content else []
    return [{"role": "system", "content": block}, *extra]


def _chatglm3_call_content(arguments: object, where: str) -> str:
    return "```python\n" + format_tool_call(arguments_object(arguments, where)) + "\n```"


def _glm4_call_content(arguments: object, where: str) -> str:
    # The arguments text as sent (the contract never re-serialises it); a parsed object as the model writes JSON.
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments_object(arguments, where), ensure_ascii=False)


def _chatglm3_read_call(segment: str) -> tuple[str, dict | None] | None:
    """(name, arguments or None when malformed) for a segment that is a call, None when it is not one."""
    header, _, body = segment.partition("\n")
    lines = body.strip().split("\n")
    if not _NAME.fullmatch(header.strip()) or not lines[0].strip().startswith("```"):
        return None
    if len(lines) < 3 or lines[-1].strip() != "```" or lines[0].strip() not in ("```python", "```py", "```"):
        return header.strip(), None
    return header.strip(), read_tool_call("\n".join(lines[1:-1]))


def _glm4_read_call(segment: str) -> tuple[str, dict | None] | None:
    header, _, body = segment.strip().partition("\n")
    body = body.strip()
    if not _NAME.fullmatch(header.strip()) or not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return header.strip(), None
    return header.strip(), value if isinstance(value, dict) else None


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-calling format: the messages its template sees and how its calls read back."""

    name: str
    tools_messages: Callable[[str, list], list[dict]]
    """(system text, tools) -> the family messages that present the tools (an empty text means the default)."""
    call_content: Callable[[object, str], str]
    """(arguments, where) -> the content of a call message (its metadata is the tool name)."""
    read_call: Callable[[str], tuple[str, dict | None] | None]
    """One reply segment -> None (not a call), (name, None) (a call that does not parse) or (name, arguments)."""
    renders_empty_messages: bool
    """False where the template skips a message whose content is empty (GLM-4's does, name and all)."""
    plain_text_cleanup: Callable[[str], str] = str.strip
    """What the official parser does to a plain answer."""

    # --- requests -> family messages ------------------------------------------------------------------------------

    def to_family_messages(self, messages: Sequence[dict], tools: object = None) -> list[dict]:
        """Map an OpenAI-style conversation (and its `tools`) to this family's messages (see the module doc)."""
        if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
            raise UserError("messages must be a list of {role, content} objects")
        tools = check_tools(tools)
        out = self.tools_messages("", tools) if tools else []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise UserError(f"message {i} is not an object")
            out += self._message(i, m)
        if not self.renders_empty_messages:
            out = [m for m in out if m["content"]]
        return out

    def _message(self, i: int, m: dict) -> list[dict]:
        role, content = m.get("role"), m.get("content")
        extra = {"loss": m["loss"]} if "loss" in m else {}
        if role == "system" and m.get("tools") is not None:
            return [{**msg, **extra} for msg in self.tools_messages(_text(content, i), check_tools(m["tools"]))]
        if role in TOOL_ROLES:
            return [{"role": "observation", "content": result_text(content), **extra}]
        calls = _calls_of(i, m) if role == "assistant" else []
        if not calls:
            out = {"role": role, "content": "" if content is None else content, **extra}
            if m.get("metadata"):
                out["metadata"] = m["metadata"]
            return [out]
        thought = content if isinstance(content, str) and not m.get("function_call") else ""
        out = [{"role": "assistant", "content": thought, **extra}] if thought else []
        for k, (name, arguments) in enumerate(calls):
            where = f"message {i} call {k}"
            content = self.call_content(arguments, where)
            out.append({"role": "assistant", "metadata": name, "content": content, **extra})
        return out

    # --- model output -> message ----------------------------------------------------------------------------------

    def parse(self, text: str, tools: object = None) -> tuple[dict, int]:
        """(the assistant message a reply stands for, how many segments started a call that did not parse)."""
        known = _known_names(tools)
        contents, calls, broken = [], [], 0
        for segment in text.split(ROLE_SEPARATOR):
            found = self.read_call(segment)
            if found is not None and found[1] is not None and (known is None or found[0] in known):
                arguments = json.dumps(found[1], ensure_ascii=False)
                calls.append({"type": "function", "function": {"name": found[0], "arguments": arguments}})
                continue
            broken += found is not None and found[1] is None
            if segment.strip():
                contents.append(self.plain_text_cleanup(segment))
        message = {"role": "assistant", "content": "\n".join(contents) if contents or not calls else None}
        if calls:
            message["tool_calls"] = calls
        return message, broken


def _known_names(tools: object) -> set[str] | None:
    """The names calls may use: those of a tools list (or of an object keyed by name); None: any name."""
    if isinstance(tools, dict):
        return set(tools)
    if isinstance(tools, list):
        return {tool_name(t) for t in tools}
    return None


def _text(content: object, i: int) -> str:
    if content is None:
        return ""
    if not isinstance(content, str):
        raise UserError(f"message {i}: content must be a string")
    return content


def _calls_of(i: int, m: dict) -> list[tuple[str, object]]:
    """(name, arguments) of an assistant message's `tool_calls`, or of its legacy `function_call`."""
    raw = m.get("tool_calls") or ([{"function": m["function_call"]}] if m.get("function_call") else [])
    if not isinstance(raw, list):
        raise UserError(f"message {i}: tool_calls must be a list")
    calls = []
    for k, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise UserError(f"message {i}: tool call {k} needs a function with a name")
        calls.append((function["name"], function.get("arguments", "{}")))
    return calls


def _chatglm3_plain(text: str) -> str:
    return text.strip().replace("[[训练时间]]", "2023年")


TOOL_FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in [
        ToolFormat(
            name="chatglm3",
            tools_messages=_chatglm3_tools_messages,
            call_content=_chatglm3_call_content,
            read_call=_chatglm3_read_call,
            renders_empty_messages=True,
            plain_text_cleanup=_chatglm3_plain,
        ),
        ToolFormat(
            name="glm-4",
            tools_messages=_glm4_tools_messages,
            call_content=_glm4_call_content,
            read_call=_glm4_read_call,
            renders_empty_messages=False,
        ),
    ]
}


def uses_tools(messages: Sequence[dict], tools: object = None) -> bool:
    """Whether a conversation needs a tool format (tools given, calls or tool results in it)."""
    if tools:
        return True
    return any(
        isinstance(m, dict)
        and (m.get("tools") or m.get("tool_calls") or m.get("function_call") or m.get("role") in TOOL_ROLES)
        for m in messages
    )
