"""`chatglm-sft eval` end to end: scoring files, THUDM's metric definition, errors, a tiny model."""

from __future__ import annotations

import json

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from chatglm_sft.demo.problems import make_problems
from chatglm_sft.tokenization.synthetic import sample_texts
from tests.conftest import cli


def run(*args):
    return cli("eval", *args)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_math23k_predictions(tmp_path):
    rows = [
        {"response": "答：8", "ans": "8"},
        {"response": "答：5(7/10)", "ans": "5((7)/(10))"},
        {"response": "算不出来", "ans": "3"},
    ]
    result = run(
        "--task",
        "math23k",
        "--predictions",
        str(write_jsonl(tmp_path / "p.jsonl", rows)),
        "--output",
        str(tmp_path / "r.json"),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r.json").read_text())
    assert metrics == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}
    assert len((tmp_path / "r.records.jsonl").read_text().splitlines()) == 3
    assert "accuracy" in result.stdout


def direct_thudm_metrics(rows):
    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for row in rows:
        hyp, ref = list(jieba.cut(row["response"])), list(jieba.cut(row["reference"]))
        result = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            scores[key].append(result[key]["f"] * 100)
        bleu = sentence_bleu(
            [list(row["reference"])], list(row["response"]), smoothing_function=SmoothingFunction().method3
        )
        scores["bleu-4"].append(bleu * 100)
    return {k: sum(v) / len(v) for k, v in scores.items()}


def score_generation(tmp_path, rows):
    """`eval --task generation` on `rows` (response and reference fields); metrics land in tmp_path/r.json."""
    predictions = str(write_jsonl(tmp_path / "p.jsonl", rows))
    return run(
        *("--task", "generation", "--predictions", predictions, "--answer-field", "reference"),
        *("--output", str(tmp_path / "r.json")),
    )


def test_generation_matches_direct_computation(tmp_path):
    # Chinese references with responses that share part of them (every other character, then other text).
    references = [p["question"] + p["solution"] for p in make_problems(30, seed=3)]
    others = sample_texts(30, seed=4)
    rows = [
        {"response": ref[::2] + other[:10], "reference": ref} for ref, other in zip(references, others, strict=True)
    ]
    result = score_generation(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    ours = json.loads((tmp_path / "r.json").read_text())
    for key, value in direct_thudm_metrics(rows).items():
        assert abs(ours[key] - value) <= 1e-3, key


def test_empty_side_scores_zero(tmp_path):
    rows = [{"response": "", "reference": "一条裙子"}]
    result = score_generation(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["rouge-1"] == 0


@pytest.mark.parametrize("content", [None, '{"response": "x"', "[1, 2]\n", ""])
def test_missing_or_malformed_predictions(tmp_path, content):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    result = run("--task", "math23k", "--predictions", str(path), "--output", str(tmp_path / "r.json"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(path) in result.stderr


@pytest.mark.slow
def test_model_mode_end_to_end(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    problems = [
        {"id": str(i), "original_text": p["question"], "ans": str(p["answer"])}
        for i, p in enumerate(make_problems(37, seed=9))
    ]
    data = tmp_path / "math23k.json"
    data.write_text(json.dumps(problems, ensure_ascii=False))
    result = run(
        "--task",
        "math23k",
        "--model",
        str(model),
        "--data",
        str(data),
        "--max-new-tokens",
        "6",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r.json").read_text())
    assert metrics["total"] == 37
    details = [json.loads(line) for line in (tmp_path / "r.records.jsonl").read_text().splitlines()]
    assert len(details) == 37 and all("response" in d and "original_text" in d for d in details)
    loss = run(
        "--task",
        "loss",
        "--model",
        str(model),
        "--data",
        str(tiny_alpaca),
        "--output",
        str(tmp_path / "l.json"),
    )
    assert loss.returncode == 0, loss.stderr
    assert json.loads((tmp_path / "l.json").read_text())["total"] == 40
