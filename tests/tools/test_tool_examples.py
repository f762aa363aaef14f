"""The generated tool-use dataset: valid tool records for both families, held-out requests that score."""

from __future__ import annotations

import json

import pytest

import chatglm_sft
from chatglm_sft.conversation import IGNORE_INDEX, encode_conversation
from chatglm_sft.data.dataset import check_records
from chatglm_sft.eval.tools import score
from chatglm_sft.tools.examples import HELD_OUT_CITIES, TOOLS, evaluation_records, training_records


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_generated_records_are_valid_and_train_the_calls(tiny_checkpoint, tmp_path, family):
    records = training_records(30, seed=3)
    assert training_records(30, seed=3) == records  # the seed decides everything
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    report = check_records(data, family=tok.family)
    assert report.read == 30 and not report.bad
    names = {r["messages"][1]["tool_calls"][0]["function"]["name"] for r in records}
    assert names == {t["function"]["name"] for t in TOOLS}
    languages = {r["messages"][0]["content"].isascii() for r in records}
    assert languages == {True, False}  # English and Chinese requests
    encoded = encode_conversation(tok, report.good[0][1])
    learned = tok.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert records[0]["messages"][1]["tool_calls"][0]["function"]["name"] in learned


def test_held_out_requests_score_with_eval_tools():
    held_out = evaluation_records(12)
    cities = {r["reference_tool_calls"][0]["arguments"].get("city") for r in held_out} - {None}
    assert cities <= set(HELD_OUT_CITIES)
    perfect = [{**r, "tool_calls": r["reference_tool_calls"]} for r in held_out]
    assert score(perfect)[0]["name_accuracy"] == 1.0
    silent = [{**r, "tool_calls": []} for r in held_out]
    assert score(silent)[0]["name_accuracy"] == 0.0
