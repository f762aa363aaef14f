"""`data check --model` counts tokens in worker processes for large files: the same counts as in one process."""

from __future__ import annotations

import json

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.data import lengths
from chatglm_sft.data.dataset import check_records
from chatglm_sft.data.formats import to_messages
from chatglm_sft.families import get_family
from tests.conftest import alpaca_records


def test_worker_processes_count_what_one_process_counts(tmp_path, tiny_checkpoint, monkeypatch):
    model = tiny_checkpoint("chatglm2-6b")
    records = alpaca_records(300)
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    monkeypatch.setattr(lengths, "CHUNK", 16)  # many chunks in flight
    family = get_family("chatglm2-6b")
    counted = {}
    for workers in (0, 2):
        counter = lengths.TokenCounter(model, family.name, 64, workers)
        check_records(data, family=family, on_good=counter)
        counted[workers] = counter.result()
    import chatglm_sft

    tokenizer = chatglm_sft.load_tokenizer(model)
    direct = [len(encode_conversation(tokenizer, to_messages(r, "alpaca")).input_ids) for r in records]
    assert counted[0].lengths_before_truncation == counted[2].lengths_before_truncation == direct
    assert counted[2].truncated == sum(n > 64 for n in direct) > 0
