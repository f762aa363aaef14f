"""Batch prediction over a record file: one output line per record, in input order, fields kept plus `response`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.data.formats import RecordError, prompt_messages, read_records, to_messages
from chatglm_sft.errors import UserError
from chatglm_sft.infer.chat import clean_response
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams


@dataclass
class PredictSummary:
    records: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def load_prompts(
    engine: Engine,
    data: str | Path,
    fmt: str = "auto",
    prompt_field: str | None = None,
    max_prompt_tokens: int | None = None,
) -> tuple[list[dict], list[list[int]]]:
    """Records and their prompt ids; a bad record is an error naming its file and line."""
    records, prompts = [], []
    for record in read_records(data):
        if record.error:
            raise UserError(f"{data}:{record.line}: {record.error}")
        try:
            messages = prompt_messages(to_messages(record.data, fmt, prompt_field, need_reply=False))
            ids = encode_conversation(
                engine.tokenizer, messages, add_generation_prompt=True, max_length=max_prompt_tokens
            ).input_ids
        except (RecordError, UserError) as e:
            raise UserError(f"{data}:{record.line}: {e}") from None
        records.append(record.data)
        prompts.append(ids)
    return records, prompts


def predict(
    engine: Engine,
    records: list[dict],
    prompts: list[list[int]],
    params: SamplingParams,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[dict], PredictSummary]:
    """Generate for every prompt (batched, longest first to limit padding); results in input order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: list[str | None] = [None] * len(prompts)
    generated = 0
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="predict", unit="rec", disable=not progress) as bar:
        for k in range(0, len(order), batch_size):
            chunk = order[k : k + batch_size]
            for i, result in zip(chunk, engine.generate([prompts[i] for i in chunk], params), strict=True):
                responses[i] = clean_response(result.text, engine.family)
                generated += len(result.token_ids)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    outputs = [{**record, "response": response} for record, response in zip(records, responses, strict=True)]
    return outputs, PredictSummary(len(records), sum(map(len, prompts)), generated, seconds)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` as JSON lines to `path` (whole or not at all: through a temporary file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
