"""Generated preference pairs: arithmetic word problems whose chosen reply is the correct worked answer and whose
rejected reply is a wrong one (off by one to three), in the three record shapes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from chatglm_sft.demo.problems import make_problems


def wrong_solution(problem: dict, rng: random.Random) -> str:
    a_op_b = problem["solution"].split("=")[0]
    wrong = problem["answer"] + rng.choice([-3, -2, -1, 1, 2, 3])
    return f"{a_op_b}={wrong}，答：{wrong}"


def arithmetic_pairs(count: int, seed: int = 0, shape: str = "alpaca") -> list[dict]:
    rng = random.Random(seed + 1)
    records = []
    for problem in make_problems(count, seed):
        chosen, rejected = problem["solution"], wrong_solution(problem, rng)
        if shape == "alpaca":
            records.append({"instruction": problem["question"], "input": "", "chosen": chosen, "rejected": rejected})
        elif shape == "sharegpt":
            records.append(
                {
                    "conversations": [{"from": "human", "value": problem["question"]}],
                    "chosen": {"from": "gpt", "value": chosen},
                    "rejected": {"from": "gpt", "value": rejected},
                }
            )
        else:  # TRL's conversational shape
            records.append(
                {
                    "prompt": [{"role": "user", "content": problem["question"]}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return records


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
