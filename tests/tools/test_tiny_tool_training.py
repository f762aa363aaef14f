"""Tool calling learnt for real: a tiny ChatGLM3-layout and GLM-4-layout model, LoRA-trained on the generated tool
conversations, call the right tool on held-out requests (other cities and numbers) where its base model never does."""

from __future__ import annotations

import json

import pytest

from chatglm_sft.tools.tiny_run import run_tiny_tools


@pytest.mark.slow
@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_lora_learns_to_call_the_right_tool(tmp_path, family):
    summary = run_tiny_tools(tmp_path, family)
    assert summary["before"]["name_accuracy"] <= 0.1
    assert summary["after"]["name_accuracy"] >= 0.9
    # The figures are eval --task tools' own: its per-record output says which tool each held-out request got.
    rows = [json.loads(line) for line in (tmp_path / "eval-lora.records.jsonl").read_text().splitlines()]
    assert len(rows) == summary["run"]["eval_records"]
    assert sum(r["name_match"] for r in rows) / len(rows) == summary["after"]["name_accuracy"]
