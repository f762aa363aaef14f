"""`chatglm-sft demo` from an empty directory: exits 0, the fine-tuned model beats the base one, files in place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_in_an_empty_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "chatglm_sft", "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    out = tmp_path / "chatglm-sft-demo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tuned_accuracy"] > summary["base_accuracy"]
    assert (out / "lora" / "loss.png").exists() and (out / "eval-lora.records.jsonl").exists()
    for step in range(1, 8):
        assert f"[{step}/7" in result.stdout
