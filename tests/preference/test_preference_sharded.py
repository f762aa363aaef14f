"""DPO under FSDP2 and DeepSpeed ZeRO-2 (gloo, 2 processes x 2 pairs): the same losses, rewards and trained adapter as
one process on 4 pairs per step, through the CLI as users launch it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import chatglm_sft
from chatglm_sft.train.preference import METRICS
from tests.conftest import train_in_processes
from tests.preference.pairs_data import arithmetic_pairs, write_pairs

CONFIGS = Path(__file__).parents[2] / "configs"
IDS = torch.tensor([[64790, 64792, 30910, 100, 200, 300, 400, 500]])


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    data = write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.json", arithmetic_pairs(8))
    return {"model": tiny_checkpoint("chatglm2-6b"), "data": data}


def train(inputs: dict, output: Path, processes: int, *extra: str) -> Path:
    train_in_processes(
        processes,
        *("--model", str(inputs["model"]), "--data", str(inputs["data"]), "--output", str(output)),
        *("--objective", "dpo", "--method", "lora", "--batch-size", str(4 // processes)),
        *("--max-steps", "2", "--learning-rate", "2e-3", "--precision", "fp32", "--group-by-length", "false"),
        *extra,
    )
    return output


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> Path:
    return train(inputs, tmp_path_factory.mktemp("one"), 1)


def steps(output: Path) -> list[dict]:
    return [e for e in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if "loss" in e]


def logits(inputs: dict, adapter: Path | None) -> torch.Tensor:
    model = chatglm_sft.load_model(inputs["model"], dtype=torch.float32, adapter=adapter)
    with torch.no_grad():
        return model(IDS).logits


def assert_same_run(inputs: dict, sharded: Path, one: Path) -> None:
    a, b = steps(sharded), steps(one)
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2]
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference (computed apart: rounding)
    for x, y in zip(a, b, strict=True):
        # At step 1 every margin is 0 up to rounding, and what share of them rounds above 0 says nothing.
        for key in ("loss", *(m for m in METRICS if x["step"] > 1 or m != "rewards/accuracies")):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-5), (x["step"], key)  # logps: sums of ~100
    assert a[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the first step moved the adapter
    trained, expected, untrained = logits(inputs, sharded), logits(inputs, one), logits(inputs, None)
    assert (trained - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    assert (expected - untrained).abs().max().item() > 1e-4  # it did train


@pytest.mark.slow
def test_dpo_under_fsdp_matches_one_process(inputs, one_process, tmp_path):
    fsdp = train(inputs, tmp_path / "fsdp", 2, "--distributed", "fsdp")
    assert_same_run(inputs, fsdp, one_process)


@pytest.mark.slow
def test_dpo_under_zero2_with_precomputed_reference_matches_one_process(inputs, one_process, tmp_path):
    """Also the precomputed reference, which FSDP/ZeRO runs should prefer: the same values as the live one."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    ds = ["--distributed", "deepspeed", "--deepspeed-config", str(CONFIGS / "deepspeed/zero2.json")]
    zero = train(inputs, tmp_path / "zero2", 2, *ds, "--precompute-ref")
    assert_same_run(inputs, zero, one_process)
