"""Tool calling on a tiny model, end to end on a CPU: the path the issue's item 8 measures.

A tokenizer laid out like the family's is trained on the rendered text of the generated tool-use conversations
(`chatglm_sft.tools.examples`), so the fixed tools preamble, the JSON schemas and the call syntax compress into few
tokens (a three-tool prompt is about 200 tokens for ChatGLM3, 290 for GLM-4, against about 670 with the generic
tiny tokenizer); a small model of the family's architecture gets random weights; ``eval --task tools`` (model mode)
scores it on held-out requests; a LoRA fine-tune through the ``train`` command's library function trains the calls;
the same evaluation scores the adapter. Everything lands under one output folder. With the defaults the adapter does
not yet call reliably (figures in docs/tools.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chatglm_sft.conversation import render
from chatglm_sft.families import get_family
from chatglm_sft.infer.predict import write_jsonl
from chatglm_sft.models.synthetic import write_tiny_checkpoint
from chatglm_sft.tools.examples import evaluation_records, training_records

TOKENIZER_OPTIONS = {
    "sentencepiece": {"vocab_size": 3000, "whitespace_pieces": True},
    "tiktoken": {"vocab_size": 3000},
}
"""Per `Family.tokenizer_kind`: the writer's options for a tokenizer that compresses the tools prompt."""


@dataclass(frozen=True)
class TinyToolRun:
    """The sizes of one run; the defaults are what docs/tools.md measures."""

    train_records: int = 600
    """Generated training conversations (request, call, result, answer)."""
    eval_records: int = 60
    """Held-out requests (other cities and numbers) scored before and after."""
    hidden: int = 64
    """Model width."""
    layers: int = 2
    """Transformer layers."""
    steps: int = 200
    """LoRA optimiser steps."""
    batch_size: int = 8
    """Conversations per step."""
    learning_rate: float = 1e-2
    """LoRA learning rate (high: a tiny adapter, few steps)."""
    lora_r: int = 16
    """LoRA rank."""
    max_new_tokens: int = 32
    """Generated tokens per held-out request (a call with its arguments fits)."""
    seed: int = 0
    """Seeds the data, the weights and training."""


def calls_only(record: dict) -> dict:
    """`record` with its final answer kept as context but not trained (``"loss": false``): the fine-tune spends its
    few steps on the calls, and the trained positions (each one a softmax over the family's whole vocabulary, 151,552
    ids for GLM-4) stay few."""
    *head, answer = record["messages"]
    return {**record, "messages": [*head, {**answer, "loss": False}]}


def rendered_texts(family_name: str, records: list[dict]) -> list[str]:
    """The plain text of each conversation as the family renders it (special tokens left out): tokenizer input."""
    family = get_family(family_name)
    return [s.text for r in records for s in render(family, r["messages"], False, r["tools"]) if s.text]


def build_checkpoint(folder: Path, family_name: str, records: list[dict], run: TinyToolRun) -> Path:
    """A THUDM-layout checkpoint of the family with random weights and a tokenizer trained on `records`' text."""
    family = get_family(family_name)
    head_dim = 16
    return write_tiny_checkpoint(
        folder,
        family.name,
        seed=run.seed,
        texts=rendered_texts(family.name, records),
        tokenizer_options=TOKENIZER_OPTIONS[family.tokenizer_kind],
        hidden=run.hidden,
        layers=run.layers,
        heads=run.hidden // head_dim,
        head_dim=head_dim,
        ffn=run.hidden * 3,
    )


def tools_metrics(model_dir: Path, adapter: Path | None, data: Path, output: Path, run: TinyToolRun) -> dict:
    """``chatglm-sft eval --task tools --model MODEL [--adapter A] --data DATA --output OUTPUT``, as a call."""
    import chatglm_sft
    from chatglm_sft.eval import runner
    from chatglm_sft.infer.engine import Engine
    from chatglm_sft.infer.predict import load_prompts
    from chatglm_sft.infer.sampling import SamplingParams

    model = chatglm_sft.load_model(model_dir, dtype=torch.float32, adapter=adapter)
    engine = Engine(model, chatglm_sft.load_tokenizer(model_dir))
    records, prompts = load_prompts(engine, data, "auto", None)
    params = SamplingParams(max_new_tokens=run.max_new_tokens)
    rows = runner.generate_rows("tools", engine, records, prompts, params, batch_size=32)
    metrics, details = runner.score_rows("tools", rows, None, data, engine.family)
    runner.write_results(metrics, details, output)
    return metrics


def _lora(model: Path, data: Path, output: Path, run: TinyToolRun) -> Path:
    """``chatglm-sft train --method lora ...`` through its library function."""
    from chatglm_sft.train.config import load_config
    from chatglm_sft.train.loop import train

    settings = {
        "model": str(model),
        "data": str(data),
        "output": str(output),
        "method": "lora",
        "lora_r": run.lora_r,
        "lora_alpha": 2 * run.lora_r,
        "lora_dropout": 0.0,
        "lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj",
        "max_steps": run.steps,
        "batch_size": run.batch_size,
        "learning_rate": run.learning_rate,
        "warmup_steps": 10,
        "lr_scheduler": "linear",
        "precision": "fp32",
        "seed": run.seed,
        "logging_steps": 10,
    }
    return train(load_config(None, settings))


def run_tiny_tools(output: str | Path, family: str, run: TinyToolRun | None = None) -> dict:
    """Build, evaluate, LoRA-train and evaluate again; returns (and writes to summary.json) the figures."""
    run = run or TinyToolRun()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_set = training_records(run.train_records, run.seed)
    held_out = evaluation_records(run.eval_records, run.seed + 1)
    train_file, test_file = out / "train.jsonl", out / "held_out.jsonl"
    write_jsonl([calls_only(r) for r in train_set], train_file)
    write_jsonl(held_out, test_file)
    base = build_checkpoint(out / "base", family, train_set, run)
    before = tools_metrics(base, None, test_file, out / "eval-base.json", run)
    adapter = _lora(base, train_file, out / "lora", run)
    after = tools_metrics(base, adapter, test_file, out / "eval-lora.json", run)
    summary = {
        "family": get_family(family).name,
        "run": asdict(run),
        "before": before,
        "after": after,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
