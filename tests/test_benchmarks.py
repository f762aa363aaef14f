"""The GPU benchmark is ready for a lent GPU: it runs end to end on the CPU with a tiny shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
