"""A generated tool-use dataset: calculator, weather lookup and unit conversion, asked in Chinese and English.

`training_records` gives whole conversations (request, call, the tool's result, the final answer) in the
``openai-tools`` record format; `evaluation_records` gives held-out requests (other numbers and cities, a seed of
their own) with `reference_tool_calls`, for ``chatglm-sft eval --task tools``; `copy_records` gives tool-less
"repeat after me" chats, text for a base model (see `chatglm_sft.tools.tiny_run`). Everything follows from the seed.
"""

from __future__ import annotations

import json
import random


def _function(name: str, description: str, properties: dict) -> dict:
    # No "required" list (JSON Schema's default: none): it would lengthen every prompt, which the tools preamble
    # already dominates, by a sixth.
    parameters = {"type": "object", "properties": properties}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    _function("calculator", "Evaluate an arithmetic expression", {"expression": {"type": "string"}}),
    _function("get_weather", "Current weather in a city", {"city": {"type": "string"}}),
    _function(
        "convert_units",
        "Convert a value between units",
        {"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
    ),
]
# Many training cities, so that a small model learns to call the weather tool from the question's words rather than
# from a few city names it has memorised; the held-out ones never appear in training.
TRAIN_CITIES = [
    *["北京", "上海", "广州", "成都", "武汉", "南京", "西安", "重庆", "天津", "长沙", "青岛", "厦门"],
    *["Paris", "Tokyo", "London", "Rome", "Sydney", "Cairo", "Moscow", "Seoul", "Toronto", "Dubai", "Vienna", "Lima"],
]
HELD_OUT_CITIES = ["Berlin", "深圳", "Madrid", "杭州"]
_UNITS = [("km", "mile", 0.621, "公里", "英里"), ("kg", "pound", 2.205, "千克", "磅")]


def _calculator(rng: random.Random, _cities: list[str]) -> tuple[str, dict, object, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, word_en, word_zh, result = rng.choice([("+", "plus", "加", a + b), ("*", "times", "乘以", a * b)])
    request = rng.choice([f"What is {a} {word_en} {b}?", f"{a}{word_zh}{b}等于多少？"])
    answer = f"{a} {word_en} {b} is {result}." if request.isascii() else f"{a}{word_zh}{b}等于{result}。"
    return request, {"expression": f"{a}{op}{b}"}, {"result": result}, answer


def _weather(rng: random.Random, cities: list[str]) -> tuple[str, dict, object, str]:
    city, temp = rng.choice(cities), rng.randint(-5, 35)
    # The comma keeps the city its own token: without it a tokenizer trained on this data learns "北京今天天气怎么样"
    # as one token for each training city, and a held-out city's request shares nothing with them.
    request = rng.choice([f"What's the weather in {city}?", f"{city}，今天天气怎么样？"])
    answer = f"It is {temp}°C in {city}." if request.isascii() else f"{city}现在{temp}度。"
    return request, {"city": city}, {"city": city, "temperature": temp}, answer


def _convert(rng: random.Random, _cities: list[str]) -> tuple[str, dict, object, str]:
    value = rng.randint(1, 500)
    source, target, factor, source_zh, target_zh = rng.choice(_UNITS)
    request = rng.choice([f"Convert {value} {source} to {target}s.", f"{value}{source_zh}是多少{target_zh}？"])
    result = round(value * factor, 2)
    answer = (
        f"{value} {source} is {result} {target}s."
        if request.isascii()
        else f"{value}{source_zh}是{result}{target_zh}。"
    )
    return request, {"value": value, "from_unit": source, "to_unit": target}, {"result": result}, answer


_MAKERS = {"calculator": _calculator, "get_weather": _weather, "convert_units": _convert}


def _request(rng: random.Random, cities: list[str]) -> tuple[str, str, dict, object, str]:
    name = rng.choice(list(_MAKERS))
    return (name, *_MAKERS[name](rng, cities))


def training_records(count: int, seed: int = 0) -> list[dict]:
    """Conversations with one call each: request, call, result, answer (``openai-tools`` records)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        name, request, arguments, result, answer = _request(rng, TRAIN_CITIES)
        call = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        messages = [
            {"role": "user", "content": request},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answer},
        ]
        records.append({"tools": TOOLS, "messages": messages})
    return records


def evaluation_records(count: int, seed: int = 1) -> list[dict]:
    """Held-out requests (other cities, other numbers) with the call each one expects."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        name, request, arguments, _, _ = _request(rng, HELD_OUT_CITIES)
        records.append(
            {
                "tools": TOOLS,
                "messages": [{"role": "user", "content": request}],
                "reference_tool_calls": [{"name": name, "arguments": arguments}],
            }
        )
    return records


def copy_records(count: int, seed: int = 2) -> list[dict]:
    """Plain chats (no tools) that repeat a city name, any of them held-out ones included, or a number: text from
    which a base model learns these words and to copy them from a request, as a pretrained model knows city names.
    None of them asks about the weather or calls anything."""
    rng = random.Random(seed)
    words = [*TRAIN_CITIES, *HELD_OUT_CITIES]
    records = []
    for _ in range(count):
        word = rng.choice(words) if rng.random() < 0.5 else str(rng.randint(1, 500))
        request = rng.choice([f"Repeat after me: {word}", f"请重复：{word}"])
        records.append({"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": word}]})
    return records
