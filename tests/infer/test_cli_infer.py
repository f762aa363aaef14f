"""`chatglm-sft predict` and `chatglm-sft chat` as real subprocesses on the generated tiny checkpoints."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli

RECORDS = [
    {"instruction": "你好", "id": 1},
    {
        "instruction": "请写一首很长的诗，描写春夏秋冬四季的变化和人们在每个季节里的生活，要求押韵",
        "input": "七言",
        "id": 2,
    },
    {"conversations": [{"from": "human", "value": "讲个笑话"}, {"from": "gpt", "value": "好的"}], "id": 3},
    {"instruction": "1+1=", "id": 4},
    {"instruction": "Tell me about the history of the Roman empire in as much detail as you can", "id": 5},
]


@pytest.mark.parametrize(
    "family",
    [
        "chatglm2-6b",
        pytest.param("chatglm-6b", marks=pytest.mark.slow),
        pytest.param("glm-4-9b-chat", marks=pytest.mark.slow),
    ],
)
def test_predict_batch_sizes_agree_and_keep_order(tmp_path, tiny_checkpoint, family):
    model = tiny_checkpoint(family)
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n\n")
    outputs = []
    for batch in (1, 4):
        out = tmp_path / f"out{batch}.jsonl"
        result = cli(
            "predict",
            "--model",
            str(model),
            "--data",
            str(data),
            "--output",
            str(out),
            "--batch-size",
            str(batch),
            "--max-new-tokens",
            "10",
        )
        assert result.returncode == 0, result.stderr
        assert "tokens/s" in result.stdout
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1]
    assert [row["id"] for row in outputs[0]] == [r["id"] for r in RECORDS]
    for row, record in zip(outputs[0], RECORDS, strict=True):
        assert {k: v for k, v in row.items() if k != "response"} == record
        assert isinstance(row["response"], str)


def test_predict_bad_record_names_line(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("chatglm2-6b")
    data = tmp_path / "in.jsonl"
    data.write_text('{"instruction": "ok"}\n\n{"instruction": 5}\n')
    result = cli("predict", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o.jsonl"))
    assert result.returncode == 1 and f"{data}:3" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm3-6b", "chatglm-6b"])
def test_chat_answers_twice_and_exits(tiny_checkpoint, family):
    model = tiny_checkpoint(family)
    result = cli("chat", "--model", str(model), "--max-new-tokens", "8", input="你好\n再说一次\n/exit\n")
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("user> assistant> ")]
    assert len(answers) == 2 and all(len(a) > len("user> assistant> ") for a in answers)


def test_chat_ends_cleanly_on_end_of_input(tiny_checkpoint):
    model = tiny_checkpoint("glm-4-9b-chat")
    result = cli("chat", "--model", str(model), "--max-new-tokens", "4", input="你好\n/clear\n你好\n")
    assert result.returncode == 0 and "history cleared" in result.stdout and "Traceback" not in result.stderr
