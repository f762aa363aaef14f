"""Preference objectives under DDP: 2 processes x 2 pairs give the gradients, loss and rewards of 1 process x 4."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.preference.pairs_data import arithmetic_pairs, write_pairs

SCRIPT = str(Path(__file__).parent / "ddp_pref_grads.py")


def run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_two_processes_equal_one_on_the_doubled_batch(tmp_path, tiny_checkpoint, objective):
    model = str(tiny_checkpoint("chatglm2-6b"))
    data = str(write_pairs(tmp_path / "pairs.json", arithmetic_pairs(8)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT]
    run([*torchrun, model, data, str(tmp_path / "g2"), "2", objective, "ddp", str(tmp_path / "two.pt")])
    run([sys.executable, SCRIPT, model, data, str(tmp_path / "g1"), "4", objective, "auto", str(tmp_path / "one.pt")])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    for key, value in one["metrics"].items():
        # logps are float32 sums of ~100s: summed in another order, they differ by an ulp or two (1.5e-5 at 159)
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-5), key
    assert set(one["grads"]) == set(two["grads"])
    for name, grad in one["grads"].items():
        # Summed in another order (two processes, then the all-reduce), an entry moves by float32 rounding of the
        # terms that make it, which scales with the largest entries (seen: 4.5e-6 where the largest is 0.3); a wrong
        # reduction (a sum instead of a mean, a local mean) is off by a factor.
        scale = grad.abs().max().item()
        assert torch.allclose(grad, two["grads"][name], atol=1e-4 * scale, rtol=1e-4), name
