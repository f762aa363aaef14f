"""Random and mutated records through every record format, with and without a family, as training and `data check`
read them: each is a good record or a bad one with a reason, never an exception (a crash would stop a whole file's
check at one record). Seeded: the same records every run."""

from __future__ import annotations

import copy
import json
import random

import pytest

from chatglm_sft.data.dataset import check_records
from chatglm_sft.data.formats import FORMATS
from chatglm_sft.data.pairs import check_pairs
from chatglm_sft.families import get_family

KEYS = ["instruction", "input", "output", "history", "system", "conversations", "messages", "tools", "chosen",
        "rejected", "prompt", "from", "value", "role", "content", "tool_calls", "function_call", "name", "arguments",
        "function", "type", "parameters", "observation", "metadata", "loss"]  # fmt: skip
ROLES = ["user", "assistant", "system", "observation", "tool", "function", "human", "gpt", "function_call", ""]
TEXTS = ["", " ", "hi", "你好", "<|user|>", "\n", "{}", '{"a": 1}', "get_weather", "```python\nprint(1)\n```"]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
VALID = [
    {"instruction": "q", "input": "i", "output": "a", "history": [["h", "r"]], "system": "s"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {
        "tools": [TOOL],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": TOOL["function"]}]},
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "a"},
        ],
    },
    {
        "tools": json.dumps([TOOL["function"]]),
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
            {"from": "observation", "value": "r"},
            {"from": "gpt", "value": "a"},
        ],
    },
    {
        "tools": [TOOL["function"]],
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "tool", "name": "f", "parameters": {}, "observation": "r"},
            {"role": "assistant", "content": "a"},
        ],
    },
    {
        "messages": [
            {"role": "system", "content": "", "tools": [TOOL]},
            {"role": "user", "content": "q"},
            {"role": "assistant", "metadata": "f", "content": "{}"},
            {"role": "observation", "content": "r"},
            {"role": "assistant", "content": "a"},
        ]
    },
    {"instruction": "q", "chosen": "a", "rejected": "b"},
    {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
    {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    },
]


def random_value(rng: random.Random, depth: int = 0):
    k = rng.random()
    if depth > 3 or k < 0.3:
        return rng.choice(TEXTS)
    if k < 0.4:
        return rng.choice([None, True, 0, -1, 1.5, rng.choice(ROLES)])
    if k < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutated(rng: random.Random, record: dict) -> dict:
    """A copy of `record` with one to three values replaced, removed or doubled, anywhere in it."""
    record = copy.deepcopy(record)
    for _ in range(rng.randint(1, 3)):
        places, stack = [], [record]
        while stack:
            node = stack.pop()
            for key in list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []:
                places.append((node, key))
                stack.append(node[key])
        if not places:
            break
        node, key = rng.choice(places)
        action = rng.random()
        if action < 0.6:
            node[key] = random_value(rng)
        elif isinstance(node, dict):
            del node[key]
        else:
            node.insert(key, copy.deepcopy(node[key]))
    return record


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    rng = random.Random(0)
    records = [random_value(rng, 1) if rng.random() < 0.4 else mutated(rng, rng.choice(VALID)) for _ in range(400)]
    path = tmp_path_factory.mktemp("fuzz") / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.mark.parametrize("family", [None, "chatglm-6b", "chatglm3-6b", "glm-4"])
def test_every_record_is_good_or_bad_never_a_crash(records_file, family):
    family = get_family(family) if family else None
    for fmt in FORMATS:
        fields = {"prompt_field": "instruction", "response_field": "output"} if fmt == "columns" else {}
        report = check_records(records_file, fmt, family=family, **fields)
        assert report.read == report.good_count + len(report.bad) == 400
        assert all(bad.reason for bad in report.bad)
    pairs = check_pairs(records_file, family)
    assert pairs.read == len(pairs.good) + len(pairs.bad) == 400
