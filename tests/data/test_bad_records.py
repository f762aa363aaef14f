"""Records of the wrong shape are bad records naming what is wrong, never a crash, with or without a model's family
(`data check` without --model sees what training would refuse). The cases are what a fuzzer over the record
formats found crashing or passing unchecked."""

from __future__ import annotations

import json

import pytest

from chatglm_sft.data.dataset import check_records
from chatglm_sft.data.pairs import check_pairs
from chatglm_sft.families import get_family
from tests.conftest import cli

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
USER = {"role": "user", "content": "hi"}

BAD_RECORDS = [
    (
        {"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "unknown role ['human']",
    ),
    (
        {"tools": [TOOL], "conversations": [{"from": {"x": 1}, "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "unknown role",
    ),
    ({"tools": [TOOL], "messages": [{"content": "x"}, USER, {"role": "assistant", "content": "yo"}]}, "unknown role"),
    ({"tools": [TOOL], "messages": [{"role": "wizard", "content": "x"}, USER]}, "unknown role 'wizard'"),
    ({"tools": [TOOL], "messages": [USER, {"role": "assistant", "content": ["yo"]}]}, "content must be a string"),
    ({"tools": [TOOL], "messages": [USER, {"role": "observation", "content": {"a": 1}}]}, "content must be a string"),
    ({"tools": [TOOL], "messages": [USER, {"role": "assistant", "content": "yo", "loss": "no"}]}, "loss must be"),
    (
        {"messages": [{"role": "system", "tools": [TOOL]}, USER, {"role": "assistant", "metadata": "f"}]},
        "arguments of 'f' are not a JSON object",
    ),
    (
        {
            "messages": [
                {"role": "system", "tools": [TOOL]},
                USER,
                {"role": "assistant", "metadata": ["f"], "content": "{}"},
            ]
        },
        "metadata",
    ),
    (
        {
            "messages": [
                {"role": "system", "tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
                USER,
                {"role": "assistant", "content": "yo"},
            ]
        },
        None,  # parameters as text: kept as the record has them (a good record), not a crash
    ),
]


def write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.mark.parametrize("family", [None, "glm-4", "chatglm3-6b"])
def test_bad_shapes_are_bad_records(tmp_path, family):
    data = write(tmp_path / "d.jsonl", [record for record, _ in BAD_RECORDS])
    report = check_records(data, family=get_family(family) if family else None)
    bad = {b.line: b.reason for b in report.bad}
    for line, (_, reason) in enumerate(BAD_RECORDS, start=1):
        if reason is None:
            assert line not in bad, bad[line]
        else:
            assert reason in bad.get(line, ""), (line, bad.get(line))


def test_pairs_of_the_wrong_shape_are_bad_records(tmp_path):
    pairs = [
        {
            "chosen": [{}, {"role": "assistant", "content": "a"}],
            "rejected": [{}, {"role": "assistant", "content": "b"}],
        },
        {"conversations": [{"from": ["human"], "value": "q"}], "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "q"}], "tools": [TOOL], "chosen": "a", "rejected": "b"},
        {"instruction": "q", "output": "a"},  # an SFT record
    ]
    report = check_pairs(write(tmp_path / "p.jsonl", pairs))
    assert [b.line for b in report.bad] == [1, 2, 4] and len(report.good) == 1
    assert "unknown role" in report.bad[0].reason and "unknown role" in report.bad[1].reason
    assert "not a preference pair" in report.bad[2].reason


def test_data_check_without_a_model_refuses_what_training_would(tmp_path):
    data = write(tmp_path / "d.jsonl", [{"tools": [TOOL], "messages": [{"role": "wizard", "content": "x"}, USER]}])
    result = cli("data", "check", "--data", str(data))
    assert result.returncode == 1 and "d.jsonl:1: messages[0]: unknown role 'wizard'" in result.stdout, result.stdout
