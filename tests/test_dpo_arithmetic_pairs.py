"""How benchmarks/dpo_arithmetic.py turns the SFT model's answers into preference pairs."""

from __future__ import annotations

import importlib.util
import json
import random
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


def test_the_other_operation_swaps_the_operator_and_its_result():
    script = load_script()
    problems = make_problems(40, seed=2, max_number=5)
    for problem in problems:
        a, b = (int(n) for n in problem["solution"].split("=")[0].replace("+", "-").split("-"))
        swapped = script.other_operation(problem, "equation")
        assert swapped == (f"{a}+{b}={a + b}" if "-" in problem["solution"] else f"{a}-{b}={a - b}")


def test_the_misreading_source_adds_only_where_the_wording_is_misread():
    script = load_script()
    problems = make_problems(300, seed=3, max_number=5)
    replies = script.operation_noisy_solutions(problems, rate=1.0, seed=0, reply_format="equation")
    misread = [script.MISREAD in p["question"] for p in problems]
    assert 0 < sum(misread) < len(problems)
    for problem, reply, wrong in zip(problems, replies, misread, strict=True):
        expected = script.other_operation if wrong else script.solution
        assert reply == expected(problem, "equation")
    clean = script.operation_noisy_solutions(problems, rate=0.0, seed=0, reply_format="equation")
    assert clean == [script.solution(p, "equation") for p in problems]


def test_on_policy_pairs_reject_own_mistakes_and_fill_the_rest(tmp_path):
    script = load_script()
    problems = [p for p in make_problems(60, seed=4, max_number=5) if script.MISREAD in p["question"]][:2]
    problems += [p for p in make_problems(60, seed=5, max_number=5) if "+" in p["solution"]][:2]
    # The first is answered with the wrong operation (its own mistake), the rest right.
    replies = [script.other_operation(problems[0], "equation")]
    replies += [script.solution(p, "equation") for p in problems[1:]]
    rows = [
        {"response": r, "correct": r == script.solution(p, "equation"), "pred_answer": int(r.rpartition("=")[2])}
        for p, r in zip(problems, replies, strict=True)
    ]
    records = tmp_path / "greedy.jsonl"
    records.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

    def fill(problem: dict) -> str:
        return script.other_operation(problem, "equation")

    pairs, own = script.on_policy_pairs(problems, records, random.Random(0), "equation", fill, reverse=False)
    assert own == 1
    assert [pair["rejected"] for pair in pairs] == [script.other_operation(p, "equation") for p in problems]
    assert all(pair["chosen"] == script.solution(p, "equation") for pair, p in zip(pairs, problems, strict=True))
    pairs, own = script.on_policy_pairs(problems, records, random.Random(0), "equation", None, reverse=False)
    assert [pair["rejected"] for pair in pairs] == [replies[0]]


def test_the_other_operator_keeps_the_result_and_differs_at_the_operator_alone():
    script = load_script()
    for problem in make_problems(20, seed=6, max_number=5):
        right, wrong = script.solution(problem, "equation"), script.other_operator(problem, "equation")
        assert len(right) == len(wrong)
        assert [(a, b) for a, b in zip(right, wrong, strict=True) if a != b] in ([("+", "-")], [("-", "+")])


def test_imperfect_chosen_replies_keep_the_method_and_miss_the_result_by_one():
    script = load_script()
    problems = make_problems(30, seed=7, max_number=5)
    records = [
        {
            "instruction": p["question"],
            "chosen": script.solution(p, "equation"),
            "rejected": script.shifted(p, rng, "equation"),
        }
        for p, rng in zip(problems, [random.Random(i) for i in range(30)], strict=True)
    ]
    untouched = [dict(r) for r in records]
    assert script.imperfect_chosen(untouched, problems, 0.0, seed=0, reply_format="equation") == 0
    assert untouched == records
    assert script.imperfect_chosen(records, problems, 1.0, seed=0, reply_format="equation") == len(records)
    for record, problem in zip(records, problems, strict=True):
        lhs, _, value = record["chosen"].rpartition("=")
        assert lhs == script.solution(problem, "equation").rpartition("=")[0]
        assert abs(int(value) - problem["answer"]) == 1
        assert record["chosen"] != record["rejected"]
