"""`chatglm-sft data tokenize`: every good record's `input_ids` and `labels`, exactly what training learns from.

No truncation and no packing: one JSON line per record, with the line it came from, `labels` -100 where nothing is
learned. Reading the output (or decoding its labelled runs) shows which tokens a record trains.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.data.dataset import DataReport


def write_tokenized(tokenizer, report: DataReport, output: str | Path, last_turn_only: bool = False) -> int:
    """Write one line per good record of `report` to `output`; returns how many were written."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for line, messages in report.good:
            encoded = encode_conversation(tokenizer, messages, last_turn_only=last_turn_only)
            row = {"line": line, "input_ids": encoded.input_ids, "labels": encoded.labels}
            f.write(json.dumps(row) + "\n")
    return len(report.good)
