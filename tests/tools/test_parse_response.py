"""`tok.parse_response`: THUDM's parse goldens where they return a literal call, and the safe reading otherwise."""

from __future__ import annotations

import json
import random

import pytest

import chatglm_sft
from chatglm_sft.tools.pycall import format_tool_call, read_tool_call
from tests.tools.test_tool_prompts import WEATHER, reference_cases

FAMILY_DIR = {"chatglm3": "chatglm3-6b", "glm-4": "glm-4-9b-chat"}


@pytest.fixture(scope="module")
def toks(tiny_checkpoint):
    return {f: chatglm_sft.load_tokenizer(tiny_checkpoint(d)) for f, d in FAMILY_DIR.items()}


@pytest.mark.parametrize("family", ["chatglm3", "glm-4"])
def test_parse_goldens(toks, family):
    for case in reference_cases(family, "parse"):
        message = toks[family].parse_response(case["output"], tools=case.get("tools"))
        returned = case["expected"].get("returns")
        if isinstance(returned, dict) and "arguments" in returned:
            assert not message["content"], case["id"]
            [call] = message["tool_calls"]
            assert call["function"]["name"] == returned["name"], case["id"]
            assert json.loads(call["function"]["arguments"]) == json.loads(returned["arguments"]), case["id"]
        else:  # THUDM returned text, or raised: plain content, never an exception
            assert not message.get("tool_calls"), case["id"]
            assert message["content"] == case["output"].strip(), case["id"]


def call_of(message):
    [call] = message["tool_calls"]
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_chatglm3_calls_as_the_model_writes_them(toks):
    tok = toks["chatglm3"]
    # as the engine decodes a reply: the dummy-prefix space before the fence, segments joined by <|assistant|>
    reply = "\n Let me check.<|assistant|>get_weather\n ```python\ntool_call(city='北京', days=[1, 2], x=None)\n```"
    message = tok.parse_response(reply)
    assert message["content"] == "Let me check."
    assert call_of(message) == ("get_weather", {"city": "北京", "days": [1, 2], "x": None})
    two = "a\n```python\ntool_call(k=1)\n```<|assistant|>b\n```python\ntool_call()\n```"
    calls = [c["function"] for c in tok.parse_response(two)["tool_calls"]]
    assert calls == [{"name": "a", "arguments": '{"k": 1}'}, {"name": "b", "arguments": "{}"}]


@pytest.mark.parametrize(
    "code",
    [
        "tool_call(city=__import__('os').system('touch /tmp/chatglm_sft_pwned'))",
        "tool_call(n=2**10)",
        "tool_call('北京')",
        "tool_call(**{'a': 1})",
        "other(a=1)",
        "tool_call(a=1); tool_call(b=2)",
        "tool_call(a={1, 2})",
        "tool_call(a=1",
        "tool_call(from='x')",
    ],
)
def test_chatglm3_never_evaluates(toks, code, tmp_path):
    text = f"get_weather\n```python\n{code}\n```"
    message = toks["chatglm3"].parse_response(text)
    assert not message.get("tool_calls") and message["content"] == text
    assert read_tool_call(code) is None


def test_chatglm3_trailing_text_and_unknown_names_are_not_calls(toks):
    tok = toks["chatglm3"]
    call = "get_weather\n```python\ntool_call(city='x')\n```"
    assert not tok.parse_response(call + "\nand more").get("tool_calls")
    assert not tok.parse_response(call.replace("get_weather", "rm_rf"), tools=[WEATHER]).get("tool_calls")
    assert call_of(tok.parse_response(call, tools=[WEATHER]))[0] == "get_weather"
    assert call_of(tok.parse_response(call, tools={"get_weather": {}}))[0] == "get_weather"  # tools_using_demo's shape
    assert not tok.parse_response(call, tools=["not a tool"]).get("tool_calls")
    assert tok.parse_response("one line")["content"] == "one line"
    assert tok.parse_response("two\nlines")["content"] == "two\nlines"


def test_glm4_calls(toks):
    tok = toks["glm-4"]
    assert call_of(tok.parse_response('get_weather\n{"city": "北京"}', tools=[WEATHER])) == (
        "get_weather",
        {"city": "北京"},
    )
    for bad in ['get_weather\n["北京"]', 'get_weather\n{"city": "x"} trailing', 'rm_rf\n{"path": "/"}']:
        message = tok.parse_response(bad, tools=[WEATHER])
        assert not message.get("tool_calls") and message["content"] == bad
    thought = tok.parse_response('\nOK.<|assistant|>get_weather\n{"city": "x"}')
    assert thought["content"] == "OK." and call_of(thought) == ("get_weather", {"city": "x"})


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "none"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice("ab'\"\\\n\t 北京\u200b\x07😀{}()=,:[]") for _ in range(rng.randint(0, 6)))
    if kind == "int":
        return rng.randint(-(10**20), 10**20)
    if kind == "float":
        return rng.choice([0.5, -1.25, 1e21, 3.0, 1e-7])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def test_written_calls_read_back_to_the_same_arguments():
    rng = random.Random(0)
    for _ in range(300):
        arguments = {f"arg_{i}": random_value(rng) for i in range(rng.randint(0, 4))}
        line = format_tool_call(arguments)
        assert "\n" not in line
        assert read_tool_call(line) == arguments


PIECES = [
    "<|assistant|>",
    "get_weather",
    "\n",
    " ",
    "```python",
    "```",
    "tool_call(",
    ")",
    "city=",
    "'北京'",
    "{",
    "}",
    '"city"',
    ":",
    ",",
    "[",
    "2**10",
    "__import__('os')",
    "x",
    "\\",
    "None",
    "1e309",
    "(" * 50,
]


@pytest.mark.parametrize("family", ["chatglm3", "glm-4"])
def test_parsing_random_output_never_raises(toks, family):
    rng = random.Random(family)
    for _ in range(2000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        for tools in (None, [WEATHER], {"get_weather": {}}, "junk"):
            message = toks[family].parse_response(text, tools=tools)
            assert message["role"] == "assistant"
            assert message["content"] is not None or message.get("tool_calls")
