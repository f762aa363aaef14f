"""The demo pipeline, each step printed; everything lands under one output folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chatglm_sft.demo.problems import make_problems
from chatglm_sft.demo.tokenizer import train_tokenizer
from chatglm_sft.errors import UserError
from chatglm_sft.infer.predict import write_jsonl
from chatglm_sft.models.synthetic import chatglm2_config, random_model, write_thudm_checkpoint
from chatglm_sft.train.loop import train_with

if TYPE_CHECKING:
    from chatglm_sft.infer.sampling import SamplingParams

MAX_NUMBER = 5  # operands 1..5: small enough for a tiny model to learn in a few minutes on a CPU
BASE_TRAINING = {"method": "full", "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10, "logging_steps": 10}
"""Settings of the brief base training (a full fine-tune of the random model on text)."""
LORA_SFT = {
    "method": "lora",
    "lora_r": 32,
    "lora_alpha": 64,
    "lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj",
    "batch_size": 16,
    "learning_rate": 4e-3,
    "warmup_steps": 20,
    "logging_steps": 20,
}
"""Settings of the LoRA fine-tune that teaches the base model to solve the problems."""


def base_corpus(train_set: list[dict], equations: list[dict]) -> list[dict]:
    """The base model's text: the problems and equations written out, never a problem solved."""
    return [{"instruction": "出一道应用题", "output": p["question"]} for p in train_set] + [
        {"instruction": "写一个算式", "output": e["solution"]} for e in equations
    ]


def tokenizer_texts(train_set: list[dict]) -> list[str]:
    """What the demo's tokenizer is trained on: the problems with their workings, and the chat prompt's words."""
    return [p["question"] + p["solution"] for p in train_set] + ["[Round 1]\n\n问：出一道应用题\n\n答："]


def questions(problems: list[dict]) -> list[dict]:
    """Held-out rows in Math23K's fields, for `math_accuracy`."""
    return [{"original_text": p["question"], "ans": str(p["answer"])} for p in problems]


def base_checkpoint(folder: Path, seed: int) -> Path:
    """A small ChatGLM2-architecture model with random weights, written in THUDM's layout."""
    config = chatglm2_config(hidden=128, layers=2, ffn=352, head_dim=32, max_positions=256)
    return write_thudm_checkpoint(random_model(config, seed), folder)


def math_accuracy(
    model_dir: Path, adapter: Path | None, test: Path, output: Path, params: SamplingParams | None = None
) -> float:
    """Accuracy of the answers (with `adapter`; greedy unless `params` say otherwise) to the problems in `test`,
    scored as Math23K; details in `output`."""
    import chatglm_sft
    from chatglm_sft.eval import math23k, runner
    from chatglm_sft.infer.engine import Engine
    from chatglm_sft.infer.predict import load_prompts, predict
    from chatglm_sft.infer.sampling import SamplingParams

    model = chatglm_sft.load_model(model_dir, dtype=torch.float32, adapter=adapter)
    engine = Engine(model, chatglm_sft.load_tokenizer(model_dir))
    records, prompts = load_prompts(engine, test, "columns", "original_text")
    params = params or SamplingParams(max_new_tokens=16)
    rows, _ = predict(engine, records, prompts, params, batch_size=32, progress=False)
    metrics, details = math23k.score(rows)
    runner.write_results(metrics, details, output)
    return metrics["accuracy"]


def run_demo(output: str | Path = "chatglm-sft-demo", seed: int = 0) -> dict:
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: folder exists and is not empty; pass another --output")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def step(n: int, text: str) -> None:
        print(f"\n[{n}/7 {time.perf_counter() - start:5.1f}s] {text}", flush=True)

    step(1, "generating Chinese arithmetic word problems")
    train_set, test_set = make_problems(3000, seed, MAX_NUMBER), make_problems(200, seed + 1, MAX_NUMBER)
    # The base model learns the language of the problems and of equations, but never sees a problem solved.
    equations = make_problems(3000, seed + 2, MAX_NUMBER)
    corpus = write_jsonl(base_corpus(train_set, equations), out / "corpus.jsonl")
    solved = [{"instruction": p["question"], "output": p["solution"]} for p in train_set]
    sft = write_jsonl(solved, out / "train.jsonl")
    test = write_jsonl(questions(test_set), out / "test.jsonl")
    print(
        f"train {len(train_set)}, held-out test {len(test_set)}; e.g. {train_set[0]['question']} -> "
        f"{train_set[0]['solution']}"
    )

    step(2, "training a SentencePiece tokenizer laid out like ChatGLM2's")
    init = out / "base-init"
    train_tokenizer(tokenizer_texts(train_set), init)

    step(3, "creating a small ChatGLM2-architecture model (random weights, THUDM layout)")
    base_checkpoint(init, seed)

    step(4, "brief base training: the model learns to write problems (full fine-tune)")
    base = out / "base"
    train_with(model=init, data=corpus, output=base, max_steps=150, precision="fp32", seed=seed, **BASE_TRAINING)

    step(5, "evaluating the base model on the held-out problems")
    base_accuracy = math_accuracy(base, None, test, out / "eval-base.json")
    print(f"base accuracy: {base_accuracy:.3f}")

    step(6, "LoRA fine-tune: the model learns to solve them")
    lora = out / "lora"
    train_with(model=base, data=sft, output=lora, max_steps=600, precision="fp32", seed=seed, **LORA_SFT)

    step(7, "evaluating the fine-tuned model, a few predictions")
    tuned_accuracy = math_accuracy(base, lora, test, out / "eval-lora.json")
    samples = [json.loads(line) for line in (out / "eval-lora.records.jsonl").read_text().splitlines()[:4]]
    for s in samples:
        print(f"  {s['original_text']}  ->  {s['response']}   ({'right' if s['correct'] else 'wrong'})")
    summary = {
        "base_accuracy": base_accuracy,
        "tuned_accuracy": tuned_accuracy,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_plot": str(lora / "loss.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\nheld-out accuracy: base {base_accuracy:.3f} -> LoRA {tuned_accuracy:.3f}; loss plot {lora / 'loss.png'}; "
        f"everything in {out}/ ({summary['seconds']} s)"
    )
    if tuned_accuracy <= base_accuracy:
        raise UserError("the fine-tuned model did not beat the base model on the held-out problems")
    return summary
