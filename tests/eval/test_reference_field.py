"""`eval --task generation` reads `reference` (the documented field), `summary` (ADGEN) when no record has one, or
the field --answer-field names; the scores are jieba + rouge-chinese ROUGE F1 and nltk character BLEU-4, x100."""

from __future__ import annotations

import json

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from tests.conftest import cli

PAIRS = [
    ("这件衣服的颜色很好看，适合春天穿。", "这件衣服颜色清新，很适合春天。"),
    ("简约的设计，百搭又时尚", "设计简约时尚，容易搭配"),
    ("the model answers well", "the model answers questions well"),
    ("。", "纯色的裙子"),
]


def direct(pairs) -> dict[str, float]:
    totals = dict.fromkeys(("rouge-1", "rouge-2", "rouge-l", "bleu-4"), 0.0)
    for prediction, reference in pairs:
        hyp, ref = " ".join(jieba.cut(prediction)).strip(), " ".join(jieba.cut(reference)).strip()
        try:
            scores = Rouge().get_scores(hyp, ref)[0]
            for key in ("rouge-1", "rouge-2", "rouge-l"):
                totals[key] += scores[key]["f"] * 100
        except ValueError:  # only punctuation: rouge-chinese refuses, THUDM's scripts count 0
            pass
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
        totals["bleu-4"] += bleu * 100
    return {k: v / len(pairs) for k, v in totals.items()}


@pytest.mark.parametrize(
    ("field", "flags"), [("reference", []), ("summary", []), ("gold", ["--answer-field", "gold"])]
)
def test_generation_scores_read_the_reference_field(tmp_path, field, flags):
    predictions = tmp_path / "p.jsonl"
    rows = [{"response": p, field: r, "other": "x"} for p, r in PAIRS]
    predictions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "r.json"
    result = cli("eval", "--task", "generation", "--predictions", str(predictions), "--output", str(out), *flags)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    expected = direct(PAIRS)
    assert all(abs(metrics[key] - expected[key]) <= 1e-3 for key in expected), (metrics, expected)
    assert metrics["total"] == len(PAIRS)


def test_missing_reference_names_the_record(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"response": "a", "reference": "b"}\n{"response": "c"}\n')
    result = cli("eval", "--task", "generation", "--predictions", str(predictions), "--output", str(tmp_path / "r"))
    assert result.returncode == 1 and "record 2 has no 'reference' field" in result.stderr
