"""The GPU benchmarks are ready for a lent GPU: they run end to end on the CPU with a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_train_runs_on_cpu_with_a_tiny_shape():
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_train.py"),
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--length",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "samples/s" in line]
    assert len(lines) == 2 and all("MFU" in line for line in lines)


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_cpu_with_a_tiny_shape(tmp_path):
    out = tmp_path / "suite"
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--shape", "tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=os.environ | {"PYTHON": sys.executable},  # this interpreter, whether or not its environment is on PATH
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    for side in ("ours", "baseline"):
        for run in (f"train-{side}", f"train-{side}-gc"):
            assert suite[run]["samples_per_s"] > 0 and suite[run]["peak_memory_gib"] > 0
    assert suite["train-ours-packing"]["tokens_per_s"] > 0
    assert "CUDA" in suite["qlora"]["skipped"]
    assert set(suite["decode"]) == {"bf16", "int8", "int4"} and suite["decode"]["bf16"]["logit_error"] == 0
    assert 0 < suite["decode"]["int8"]["logit_error"] < suite["decode"]["int4"]["logit_error"] < 0.5
    assert suite["dpo"]["step_seconds"] > 0
    assert "| train-ours |" in (out / "suite.md").read_text()
