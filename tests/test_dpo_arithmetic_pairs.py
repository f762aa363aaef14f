"""How benchmarks/dpo_arithmetic.py turns the SFT model's answers into preference pairs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from chatglm_sft.demo.problems import make_problems

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo_arithmetic.py"


def load_script():
    spec = importlib.util.spec_from_file_location("dpo_arithmetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_round(path: Path, problems: list[dict], replies: list[str]) -> Path:
    """Per-record results in the shape `math_accuracy` writes (response, correct)."""
    rows = [
        {"response": r, "correct": r.rpartition("=")[2] == str(p["answer"])}
        for p, r in zip(problems, replies, strict=True)
    ]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_sampled_pairs_reject_the_most_frequent_well_formed_wrong_reply(tmp_path):
    script = load_script()
    problems = make_problems(3, seed=0, max_number=5)
    right = [script.solution(p, "equation") for p in problems]
    lhs = [r.rpartition("=")[0] for r in right]
    answers = [p["answer"] for p in problems]
    rounds = [
        write_round(tmp_path / "greedy.jsonl", problems, [f"{lhs[0]}={answers[0] + 1}", right[1], right[2]]),
        write_round(tmp_path / "s0.jsonl", problems, [f"{lhs[0]}={answers[0] + 2}", "答树上还有", right[2]]),
        write_round(tmp_path / "s1.jsonl", problems, [f"{lhs[0]}={answers[0] + 2}", f"{lhs[1]}=x", right[2]]),
    ]
    pairs, count = script.sampled_pairs(problems, rounds, "equation")
    # Problem 0: its wrong result +2 twice beats +1 once. Problem 1: only malformed replies, no pair. Problem 2: right.
    assert count == 1
    assert pairs == [
        {"instruction": problems[0]["question"], "chosen": right[0], "rejected": f"{lhs[0]}={answers[0] + 2}"}
    ]


def test_a_confusion_is_the_working_with_another_integer_result():
    script = load_script()
    problem = make_problems(1, seed=1, max_number=5)[0]
    lhs = script.solution(problem, "equation").rpartition("=")[0]
    assert script.is_confusion(problem, f"{lhs}={problem['answer'] + 3}", "equation")
    assert script.is_confusion(problem, f"{lhs}={-1}", "equation")
    assert not script.is_confusion(problem, f"{lhs}={problem['answer']}", "equation")
    assert not script.is_confusion(problem, f"{lhs}=", "equation")
    assert not script.is_confusion(problem, f"1{lhs}={problem['answer'] + 1}", "equation")
