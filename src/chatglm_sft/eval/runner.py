"""`chatglm-sft eval`: generate (or read) predictions, score them, write the metrics and per-record results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from chatglm_sft.data.formats import RecordError, read_records, to_messages
from chatglm_sft.errors import UserError
from chatglm_sft.eval import generation, math23k, tools
from chatglm_sft.families import Family

TASKS = ("math23k", "generation", "loss", "tools")


@dataclass(frozen=True)
class TaskFields:
    prompt: str
    """Record field holding the prompt (model mode)."""
    answer: str
    """Record field holding the gold answer / reference."""


DEFAULT_FIELDS = {"math23k": TaskFields("original_text", "ans"), "generation": TaskFields("content", "reference")}
GENERATION_FALLBACK = "summary"
"""ADGEN's reference field: generation scoring reads it when the records have no `reference`."""


def default_answer_field(task: str, rows: list[dict]) -> str | None:
    """The gold field when --answer-field is not given: the task's, and for generation `summary` when no record
    has a `reference`."""
    fields = DEFAULT_FIELDS.get(task)
    if fields is None:
        return None
    if task == "generation" and not any(fields.answer in row for row in rows):
        return GENERATION_FALLBACK
    return fields.answer


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL; every row must be an object."""
    rows = []
    for record in read_records(path):
        if record.error:
            raise UserError(f"{path}:{record.line}: {record.error}")
        if not isinstance(record.data, dict):
            raise UserError(f"{path}:{record.line}: expected a JSON object")
        rows.append(record.data)
    if not rows:
        raise UserError(f"{path}: no predictions")
    return rows


def check_fields(rows: list[dict], path: str | Path, fields: tuple[str, ...]) -> None:
    for i, row in enumerate(rows):
        for field in fields:
            if field not in row:
                raise UserError(f"{path}: record {i + 1} has no {field!r} field")


def score_rows(
    task: str, rows: list[dict], answer_field: str | None, source: str | Path, family: Family | None = None
) -> tuple[dict, list[dict]]:
    if task == "tools":  # `family` reads raw responses' calls
        return tools.score(rows, family, str(source))
    answer_field = answer_field or default_answer_field(task, rows)
    if task == "math23k":
        check_fields(rows, source, ("response", answer_field))
        return math23k.score(rows, answer_field=answer_field)
    check_fields(rows, source, ("response", answer_field))
    return generation.score(rows, reference_field=answer_field)


def generate_rows(task: str, engine, records: list[dict], prompts: list[list[int]], params, batch_size: int):
    """Model mode: each record with the model's `response` (tool replies keep their segments apart)."""
    if task == "tools":
        return tools.generate_responses(engine, records, prompts, params, batch_size)
    from chatglm_sft.infer.predict import predict

    return predict(engine, records, prompts, params, batch_size=batch_size)[0]


def loss_examples(
    tokenizer, data: str | Path, fmt: str, prompt_field: str | None, response_field: str | None, max_length: int | None
):
    from chatglm_sft.conversation import encode_conversation

    examples = []
    for record in read_records(data):
        if record.error:
            raise UserError(f"{data}:{record.line}: {record.error}")
        try:
            messages = to_messages(record.data, fmt, prompt_field, response_field, need_reply=True)
        except RecordError as e:
            raise UserError(f"{data}:{record.line}: {e}") from None
        encoded = encode_conversation(tokenizer, messages, max_length=max_length)
        examples.append((encoded.input_ids, encoded.labels))
    return examples


def write_results(metrics: dict, details: list[dict], output: str | Path) -> Path:
    """Metrics to OUTPUT (JSON) and per-record results beside it (OUTPUT with .records.jsonl)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    records = output.with_suffix(".records.jsonl")
    with records.open("w", encoding="utf-8") as f:
        for row in details:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return records


def format_table(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
