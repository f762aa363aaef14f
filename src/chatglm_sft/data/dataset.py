"""Validating training records and tokenizing them, with nothing dropped silently.

`check_records` sorts every record of a file into good conversations and bad records (file, line, reason);
`tokenize_records` turns good ones into `input_ids`/`labels` through the conversation encoder and reports lengths.
The tokenized set is cached with `datasets` under the output folder, keyed by everything that shapes the ids (the
data, the tokenizer files, family and template, the settings and the encoder's code). One pass over the file; a
caller that needs only counts never holds the records (`on_good`, `chatglm_sft.data.lengths`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatglm_sft.conversation import encode_conversation, render
from chatglm_sft.data.formats import RecordError, read_records, to_messages
from chatglm_sft.data.tool_formats import check_ending
from chatglm_sft.errors import UserError
from chatglm_sft.families import Family


@dataclass
class BadRecord:
    file: str
    line: int
    reason: str
    data: object = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class DataReport:
    file: str
    read: int = 0
    good: list[tuple[int, list[dict]]] = field(default_factory=list)
    """(line, messages) of every usable record, in file order (empty when they were handed on instead)."""
    bad: list[BadRecord] = field(default_factory=list)
    good_count: int = 0


def check_each(
    path: str | Path, validate: Callable[[dict], Any], on_good: Callable[[int, Any], None] | None = None
) -> DataReport:
    """Read every record of `path` in one pass and validate it with `validate(data) -> value`, which raises
    `RecordError` or `UserError` for a bad one (named in the report with its line). Good values are kept in
    `report.good` as (line, value), or, with `on_good(line, value)`, handed on instead (so a caller that only needs
    their lengths never holds them all)."""
    report = DataReport(str(path))
    for record in read_records(path):
        report.read += 1
        if record.error:
            report.bad.append(BadRecord(str(path), record.line, record.error))
            continue
        try:
            value = validate(record.data)
        except (RecordError, UserError) as e:
            report.bad.append(BadRecord(str(path), record.line, str(e), record.data))
            continue
        report.good_count += 1
        if on_good is None:
            report.good.append((record.line, value))
        else:
            on_good(record.line, value)
    return report


def check_records(
    path: str | Path,
    fmt: str = "auto",
    prompt_field: str | None = None,
    response_field: str | None = None,
    family: Family | None = None,
    on_good: Callable[[int, list[dict]], None] | None = None,
) -> DataReport:
    """Read and validate every record (`check_each`: the good ones as (line, messages)); with a family, also check
    its chat template accepts the conversation."""

    def conversation(data: dict) -> list[dict]:
        messages = to_messages(data, fmt, prompt_field, response_field, need_reply=True)
        check_ending(messages)
        if family is not None:
            render(family, messages, add_generation_prompt=False)
        return messages

    return check_each(path, conversation, on_good)


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    lengths_before_truncation: list[int]
    max_length: int

    @property
    def truncated(self) -> int:
        return sum(n > self.max_length for n in self.lengths_before_truncation)


def tokenize_records(
    tokenizer, conversations: Iterable[list[dict]], max_length: int, last_turn_only: bool = False
) -> Tokenized:
    ids, labels, lengths = [], [], []
    for messages in conversations:
        full = encode_conversation(tokenizer, messages, last_turn_only=last_turn_only)
        lengths.append(len(full.input_ids))
        if len(full.input_ids) > max_length:
            full = encode_conversation(tokenizer, messages, max_length=max_length, last_turn_only=last_turn_only)
        ids.append(full.input_ids)
        labels.append(full.labels)
    return Tokenized(ids, labels, lengths, max_length)


def length_summary(lengths: list[int]) -> str:
    if not lengths:
        return "no records"
    return (
        f"min {min(lengths)}, median {statistics.median(lengths):.0f}, mean {statistics.fmean(lengths):.1f}, "
        f"max {max(lengths)}"
    )


def format_report(report: DataReport, tokenized: Tokenized | None = None, shown: int = 20) -> str:
    lines = [
        f"file: {report.file}",
        f"records read: {report.read}",
        f"good: {report.good_count}",
        f"bad: {len(report.bad)}",
    ]
    lines += [f"  {bad}" for bad in report.bad[:shown]]
    if len(report.bad) > shown:
        lines.append(f"  ... and {len(report.bad) - shown} more")
    if tokenized is not None:
        lines.append(f"tokens per example: {length_summary(tokenized.lengths_before_truncation)}")
        lines.append(f"longer than --max-length {tokenized.max_length} (would be truncated): {tokenized.truncated}")
    return "\n".join(lines)


def write_rejected(bad: list[BadRecord], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in bad:
            f.write(
                json.dumps(
                    {"file": record.file, "line": record.line, "reason": record.reason, "record": record.data},
                    ensure_ascii=False,
                )
                + "\n"
            )


ENCODER_MODULES = (
    "chatglm_sft.conversation",
    "chatglm_sft.families",
    "chatglm_sft.data.dataset",
    "chatglm_sft.data.formats",
    "chatglm_sft.data.pairs",
    "chatglm_sft.data.readers",
    "chatglm_sft.tools.formats",
    "chatglm_sft.tokenization",
)
"""The code that turns a record into ids: any change to it gives tokenized data a new cache key."""


def cache_key(data_path: str | Path, tokenizer_dir: str | Path, family: Family, settings: dict) -> str:
    """A key that changes with the data file's content, the tokenizer's files, the family and its template, the
    settings (max_length and the others that shape the examples) and the encoder's code."""
    digest = hashlib.sha256()
    _hash_file(digest, Path(data_path))
    for path in tokenizer_files(Path(tokenizer_dir), family):
        digest.update(path.name.encode())
        _hash_file(digest, path)
    digest.update(
        json.dumps({"family": family.name, "template": family.template, **settings}, sort_keys=True).encode()
    )
    digest.update(encoder_digest().encode())
    return digest.hexdigest()[:16]


def tokenizer_files(folder: Path, family: Family) -> list[Path]:
    """The files of `folder` a tokenizer is built from: the family's tokenizer file and every *token* file."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name == family.tokenizer_file or "token" in p.name)
    )


@functools.cache
def encoder_digest() -> str:
    digest = hashlib.sha256()
    for name in ENCODER_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        files = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
        for path in files:
            _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def cached_columns(cache_dir: Path, key: str, build: Callable[[], dict[str, list]]) -> dict[str, Sequence]:
    """The tokenized set's columns from `cache_dir/key`, or built with `build()` (equal-length lists by name) and
    saved there."""
    from datasets import Dataset, load_from_disk

    target = cache_dir / key
    if target.is_dir():
        dataset = load_from_disk(str(target))
        return {name: dataset[name] for name in dataset.column_names}
    columns = build()
    tmp = cache_dir / f".{key}.tmp"
    Dataset.from_dict(columns).save_to_disk(str(tmp))
    tmp.rename(target)
    return columns
