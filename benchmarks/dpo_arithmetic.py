"""DPO after SFT on a tiny model: does preference tuning raise held-out accuracy on generated arithmetic problems?

The demo's pipeline (a small ChatGLM2-architecture model and tokenizer made on the spot, brief base training, LoRA
SFT on worked solutions), then DPO from the SFT adapter (`--ref-adapter`: the reference is the SFT model) on pairs
whose chosen reply is the correct worked answer and whose rejected reply is the same working with a wrong result
(off by 1 to 3). Held-out accuracy (greedy, the Math23K scorer) before and after DPO.

    python benchmarks/dpo_arithmetic.py OUTPUT_DIR [--base-steps 150] [--sft-steps 600] [--dpo-steps 150]
        [--beta 0.1] [--learning-rate 5e-4]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from chatglm_sft.demo.problems import make_problems
from chatglm_sft.demo.run import MAX_NUMBER, _base_checkpoint, _math_accuracy, _train, _write_jsonl
from chatglm_sft.demo.tokenizer import train_tokenizer

LORA = {"lora_r": 32, "lora_alpha": 64, "lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"}


def wrong(problem: dict, rng: random.Random) -> str:
    working = problem["solution"].split("=")[0]
    value = problem["answer"] + rng.choice([-3, -2, -1, 1, 2, 3])
    return f"{working}={value}，答：{value}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    args = parser.parse_args()
    out, seed, start = Path(args.output), args.seed, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = make_problems(3000, seed, MAX_NUMBER), make_problems(200, seed + 1, MAX_NUMBER)
    equations = make_problems(3000, seed + 2, MAX_NUMBER)
    corpus = _write_jsonl(
        out / "corpus.jsonl",
        [{"instruction": "出一道应用题", "output": p["question"]} for p in train_set]
        + [{"instruction": "写一个算式", "output": e["solution"]} for e in equations],
    )
    sft = _write_jsonl(out / "sft.jsonl", [{"instruction": p["question"], "output": p["solution"]} for p in train_set])
    rng = random.Random(seed)
    pairs = _write_jsonl(
        out / "pairs.jsonl",
        [{"instruction": p["question"], "chosen": p["solution"], "rejected": wrong(p, rng)} for p in train_set],
    )
    test_rows = [{"original_text": p["question"], "ans": str(p["answer"])} for p in test_set]
    test = _write_jsonl(out / "test.jsonl", test_rows)
    init = out / "base-init"
    texts = [p["question"] + p["solution"] for p in train_set] + ["[Round 1]\n\n问：出一道应用题\n\n答："]
    train_tokenizer(texts, init)
    _base_checkpoint(init, seed)
    base = out / "base"
    common = {"precision": "fp32", "seed": seed}
    _train(model=str(init), data=str(corpus), output=str(base), method="full", max_steps=args.base_steps,
           batch_size=16, learning_rate=3e-3, warmup_steps=10, logging_steps=10, **common)  # fmt: skip
    lora = out / "sft"
    _train(model=str(base), data=str(sft), output=str(lora), method="lora", max_steps=args.sft_steps, batch_size=16,
           learning_rate=4e-3, warmup_steps=20, logging_steps=20, **LORA, **common)  # fmt: skip
    sft_accuracy = _math_accuracy(base, lora, test, out / "eval-sft.json")
    print(f"SFT accuracy: {sft_accuracy:.3f}", flush=True)
    dpo = out / "dpo"
    _train(model=str(base), data=str(pairs), output=str(dpo), objective="dpo", method="lora", ref_adapter=str(lora),
           beta=args.beta, max_steps=args.dpo_steps, batch_size=16, learning_rate=args.learning_rate,
           warmup_steps=10, logging_steps=10, lora_dropout=0.0, **common)  # fmt: skip
    dpo_accuracy = _math_accuracy(base, dpo, test, out / "eval-dpo.json")
    log = [json.loads(line) for line in (dpo / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    summary = {
        "sft_accuracy": sft_accuracy,
        "dpo_accuracy": dpo_accuracy,
        "dpo_first_loss": steps[0]["loss"],
        "dpo_last_loss": steps[-1]["loss"],
        "dpo_last_margin": steps[-1]["rewards/margins"],
        "dpo_last_reward_accuracy": steps[-1]["rewards/accuracies"],
        "settings": vars(args),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
