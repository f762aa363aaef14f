"""`chatglm-sft eval --task tools`: metrics on constructed predictions, computed by hand."""

from __future__ import annotations

import json

import pytest

from chatglm_sft.errors import UserError
from chatglm_sft.eval.tools import score
from chatglm_sft.families import get_family
from tests.conftest import cli
from tests.tools.test_tool_prompts import WEATHER

W = {"name": "get_weather", "arguments": {"city": "北京"}}
ROWS = [
    # 1. the right call; arguments as JSON text, other key order and spacing: still equal
    {"reference_tool_calls": [W], "tool_calls": [{"name": "get_weather", "arguments": '{ "city":"北京" }'}]},
    # 2. right name, wrong arguments
    {"reference_tool_calls": [W], "tool_calls": [{"name": "get_weather", "arguments": {"city": "上海"}}]},
    # 3. wrong tool
    {"reference_tool_calls": [W], "tool_calls": [{"name": "convert", "arguments": {}}]},
    # 4. no call where one was expected
    {"reference_tool_calls": [W], "tool_calls": []},
    # 5. parallel calls in another order (OpenAI's shape): equal as multisets
    {
        "reference_tool_calls": [W, {"name": "convert", "arguments": {"x": 1}}],
        "tool_calls": [
            {"type": "function", "function": {"name": "convert", "arguments": '{"x": 1}'}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        ],
    },
    # 6. no call expected, none made
    {"reference_tool_calls": None, "tool_calls": None},
    # 7. no call expected, one made
    {"reference_tool_calls": [], "tool_calls": [W]},
    # 8. a raw GLM-4 response with the right call
    {"reference_tool_calls": [W], "response": 'get_weather\n{"city": "北京"}', "tools": [WEATHER]},
    # 9. a raw response that starts a call and breaks off: no call, one parse error
    {"reference_tool_calls": [W], "response": 'get_weather\n{"city": '},
    # 10. a raw plain answer where none was expected
    {"reference_tool_calls": None, "response": "It is sunny."},
]
EXPECTED = {
    "call_recall": 5 / 7,  # records 1 2 3 5 8 of the 7 expecting a call (1 2 3 4 5 8 9)
    "call_precision": 5 / 6,  # of the 6 with a call (1 2 3 5 7 8), all but 7 expected one
    "name_accuracy": 4 / 7,  # 1 2 5 8
    "arguments_exact": 3 / 7,  # 1 5 8
    "no_call_accuracy": 2 / 3,  # 6 and 10 of 6 7 10
    "parse_errors": 1,  # 9
}


def test_metrics_by_hand():
    metrics, details = score(ROWS, get_family("glm-4"))
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value), key
    assert [d["name_match"] for d in details] == [True, True, False, False, True, True, False, True, False, True]
    assert details[7]["predicted_tool_calls"] == [W]


def test_chatglm3_responses_are_read_with_its_parser():
    rows = [{"reference_tool_calls": [W], "response": "get_weather\n ```python\ntool_call(city='北京')\n```"}]
    assert score(rows, get_family("chatglm3-6b"))[0]["arguments_exact"] == 1.0
    assert score(rows, get_family("glm-4"))[0]["call_recall"] == 0.0  # not GLM-4's format


def test_raw_responses_need_a_family():
    with pytest.raises(UserError, match="--family"):
        score([{"reference_tool_calls": [W], "response": "x"}])


def test_cli_writes_metrics_records_and_table(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "r.json"
    result = cli(
        "eval", "--task", "tools", "--predictions", str(predictions), "--output", str(out), "--family", "glm-4"
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert {k: metrics[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    records = [json.loads(line) for line in out.with_suffix(".records.jsonl").read_text().splitlines()]
    assert len(records) == len(ROWS) and records[8]["parse_error"] is True
    assert "name_accuracy" in result.stdout and "0.5714" in result.stdout


def test_cli_model_mode_generates_then_scores(tiny_checkpoint, tmp_path):
    data = tmp_path / "d.jsonl"
    record = {"messages": [{"role": "user", "content": "北京天气？"}], "tools": [WEATHER], "reference_tool_calls": [W]}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record, ensure_ascii=False) + "\n")
    out = tmp_path / "r.json"
    model = str(tiny_checkpoint("glm-4-9b-chat"))
    result = cli(
        "eval", "--task", "tools", "--model", model, "--data", str(data), "--output", str(out), "--max-new-tokens", "4"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["total"] == 2
    records = [json.loads(line) for line in out.with_suffix(".records.jsonl").read_text().splitlines()]
    assert all(isinstance(r["response"], str) for r in records)
