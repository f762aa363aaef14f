"""Training records with tools: the four record shapes, their validation, THUDM's label convention, and
`chatglm-sft data tokenize` against THUDM's fine-tuning ids and labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import chatglm_sft
from chatglm_sft.conversation import IGNORE_INDEX, encode_conversation
from chatglm_sft.data.dataset import check_records
from tests.conftest import DATA, MODELS, cli, need_shared
from tests.tools.test_tool_prompts import WEATHER, reference_cases

FUNCTION = WEATHER["function"]
CALL_ARGS = {"city": "北京"}
RESULT = {"temp": 22}

# One conversation (a call, its result, the answer) in each record shape.
SHAPES = {
    "openai-tools": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "北京天气？"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGS, ensure_ascii=False)},
                    }
                ],
            },
            {"role": "tool", "content": json.dumps(RESULT)},
            {"role": "assistant", "content": "22度"},
        ],
    },
    "sharegpt-tools": {
        "tools": json.dumps([FUNCTION], ensure_ascii=False),
        "conversations": [
            {"from": "human", "value": "北京天气？"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": CALL_ARGS})},
            {"from": "observation", "value": json.dumps(RESULT)},
            {"from": "gpt", "value": "22度"},
        ],
    },
    "chatglm3-tools": {
        "tools": [FUNCTION],
        "conversations": [
            {"role": "user", "content": "北京天气？"},
            {"role": "tool", "name": "get_weather", "parameters": CALL_ARGS, "observation": RESULT},
            {"role": "assistant", "content": "22度"},
        ],
    },
    "glm4-tools": {
        "messages": [
            {"role": "system", "content": "", "tools": [WEATHER]},
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "metadata": "get_weather", "content": json.dumps(CALL_ARGS, ensure_ascii=False)},
            {"role": "observation", "content": json.dumps(RESULT)},
            {"role": "assistant", "content": "22度"},
        ]
    },
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def learned_runs(encoded) -> list[list[int]]:
    runs, run = [], []
    for label in [*encoded.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    return runs


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_four_shapes_train_the_same_ids_and_labels(tiny_checkpoint, tmp_path, family):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    results = {}
    for shape, record in SHAPES.items():
        report = check_records(write_jsonl(tmp_path / f"{shape}.jsonl", [record]), family=tok.family)
        assert not report.bad, (shape, report.bad)
        encoded = encode_conversation(tok, report.good[0][1])
        results[shape] = (encoded.input_ids, encoded.labels)
    first = results["openai-tools"]
    assert all(result == first for result in results.values())
    runs = learned_runs(encode_conversation(tok, check_records(tmp_path / "openai-tools.jsonl").good[0][1]))
    assert len(runs) == 2  # the call (with the observation token after it), the answer (with the end token)
    assert "get_weather" in tok.decode(runs[0]) and runs[0][-1] == tok.special_id("<|observation|>")
    assert "22度" in tok.decode(runs[1]) and runs[1][-1] == tok.family.reply_end_id
    assert "temp" not in tok.decode(runs[0] + runs[1])


def test_loss_false_and_train_on_last(tiny_checkpoint, tmp_path):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint("chatglm3-6b"))
    record = json.loads(json.dumps(SHAPES["chatglm3-tools"]))
    record["conversations"][1]["loss"] = False
    [(_, messages)] = check_records(write_jsonl(tmp_path / "r.jsonl", [record])).good
    runs = learned_runs(encode_conversation(tok, messages))
    assert len(runs) == 1 and "22度" in tok.decode(runs[0])
    model = str(tiny_checkpoint("chatglm3-6b"))
    data = write_jsonl(tmp_path / "records.jsonl", [SHAPES["chatglm3-tools"]])
    for train_on, count in (("all", 2), ("last", 1)):
        out = tmp_path / f"tokenized-{train_on}.jsonl"
        result = cli(
            "data", "tokenize", "--model", model, "--data", str(data), "--output", str(out), "--train-on", train_on
        )
        assert result.returncode == 0, result.stderr
        row = json.loads(out.read_text())
        labels = [IGNORE_INDEX, *row["labels"]]
        starts = sum(1 for a, b in zip(labels, labels[1:], strict=False) if a == IGNORE_INDEX and b != IGNORE_INDEX)
        assert starts == count


BAD = [
    (
        {"tools": [WEATHER], "messages": [{"role": "user", "content": "x"}, *SHAPES["openai-tools"]["messages"][1:2]]},
        None,
    ),
    (
        {"tools": [WEATHER], "conversations": [{"role": "tool", "name": "rm_rf", "parameters": {}, "observation": 1}]},
        "not among the tools",
    ),
    (
        {"tools": [FUNCTION], "conversations": [{"role": "tool", "name": "get_weather", "parameters": [1]}]},
        "not a JSON object",
    ),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]}, "without a call"),
    ({"tools": {"get_weather": FUNCTION}, "messages": [{"role": "user", "content": "x"}]}, "list of functions"),
    ({"tools": [{"type": "function"}], "messages": [{"role": "user", "content": "x"}]}, "not a function"),
]


def test_data_check_names_file_and_line_of_each_bad_tool_record(tiny_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [record for record, _ in BAD])
    result = cli("data", "check", "--data", str(data), "--model", str(tiny_checkpoint("glm-4-9b-chat")))
    assert result.returncode == 1
    for line, (_, reason) in enumerate(BAD, start=1):
        if reason:
            assert f"bad.jsonl:{line}: " in result.stdout and reason in result.stdout, (reason, result.stdout)
    assert "good: 1" in result.stdout  # the first record ends on a call: learnable


def test_tool_records_on_a_family_without_tools_are_bad_records(tiny_checkpoint, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [SHAPES["openai-tools"]])
    result = cli("data", "check", "--data", str(data), "--model", str(tiny_checkpoint("chatglm2-6b")))
    assert result.returncode == 1 and "t.jsonl:1: chatglm2-6b has no tool-calling format" in result.stdout


def test_glaive_demo_file_reads_and_its_two_broken_records_are_found(tiny_checkpoint):
    data = need_shared(DATA / "sharegpt" / "glaive_toolcall_zh_demo.json")
    report = check_records(data, family=chatglm_sft.load_tokenizer(tiny_checkpoint("glm-4-9b-chat")).family)
    # two records answer a call written as assistant prose ("AI 计算折扣: {...}") with an observation
    assert report.read == 300 and [b.line for b in report.bad] == [5819, 8763]
    assert all("a tool result without a call before it" in b.reason for b in report.bad)
    as_sharegpt = check_records(data, "sharegpt")  # what LLaMA-Factory users pass: read as tool records too
    assert [b.line for b in as_sharegpt.bad] == [5819, 8763] and as_sharegpt.good == report.good


@pytest.mark.parametrize("family,model", [("chatglm3", "chatglm3-6b"), ("glm-4", "glm-4-9b-chat")])
def test_data_tokenize_gives_thudm_fine_tuning_ids_and_labels(tmp_path, family, model):
    cases = reference_cases(family, "train")
    records = [case["data"] for case in cases]
    data, out = write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "out.jsonl"
    result = cli(
        "data", "tokenize", "--model", str(need_shared(MODELS / model)), "--data", str(data), "--output", str(out)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(cases)
    for case, row in zip(cases, rows, strict=True):
        expected = case.get("direct") or case  # GLM-4: the plain record's result (not through `datasets`)
        n = case.get("unpadded_length") or len(expected["input_ids"])  # ChatGLM3: before the padding
        assert row["input_ids"] == expected["input_ids"][:n], case["id"]
        if case.get("combine"):
            # combine=True trains only the last reply, minus its first token; we keep the one convention for all
            pairs = zip(expected["labels"], row["labels"], strict=True)
            assert all(y in (IGNORE_INDEX, mine) for y, mine in pairs), case["id"]
        else:
            assert row["labels"] == expected["labels"][:n], case["id"]
