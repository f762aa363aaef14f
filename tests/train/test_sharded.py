"""FSDP2 and DeepSpeed ZeRO-2/3 on this CPU (gloo, 2 processes): the same result as one process on the doubled
batch, and sharded checkpoints that resume to the same end."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chatglm_sft
from chatglm_sft.errors import UserError
from chatglm_sft.train.config import load_config
from chatglm_sft.train.parallel import choose_strategy, deepspeed_config
from tests.conftest import train_in_processes

CONFIGS = Path(__file__).parents[2] / "configs"
# Enough steps for AdamW to move every weight, few enough for float rounding to stay far below the tolerance.
STEPS = ["--max-steps", "4", "--save-steps", "2", "--learning-rate", "2e-3"]
INPUTS: dict[str, Path] = {}
"""The base model and the training data of this module's runs (see `inputs`)."""


@pytest.fixture(scope="module", autouse=True)
def inputs(tiny_checkpoint, tiny_alpaca):
    INPUTS.update(model=tiny_checkpoint("chatglm2-6b"), data=tiny_alpaca)


def train(output: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    batch = str(4 // processes)  # the same 4 examples per step however many processes share them
    return train_in_processes(
        processes,
        *("--model", str(INPUTS["model"]), "--data", str(INPUTS["data"]), "--output", str(output)),
        *("--max-samples", "24", "--batch-size", batch, "--precision", "fp32"),
        *("--lora-dropout", "0", "--group-by-length", "false", *STEPS, *extra),
    )


def result_tensors(output: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (output / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(output / name))


def logits(output: Path) -> torch.Tensor:
    """The trained model's logits on a fixed input. Compared as functions, not tensor by tensor: some weights (the
    key biases, to which softmax is blind) get gradients that are pure rounding noise, which AdamW turns into
    learning-rate-sized steps that differ between any two summation orders and change no output."""
    base = INPUTS["model"]
    ids = torch.tensor([[64790, 64792, 30910, 100, 200, 300, 400, 500]])
    adapter = output if (output / "adapter_config.json").exists() else None
    model = chatglm_sft.load_model(base if adapter else output, dtype=torch.float32, adapter=adapter)
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(a: Path, b: Path) -> None:
    la, lb = logits(a), logits(b)
    assert (la - lb).abs().max().item() <= 1e-4 * la.abs().max().item()
    base = chatglm_sft.load_model(INPUTS["model"], dtype=torch.float32)
    with torch.no_grad():
        untrained = base(torch.tensor([[64790, 64792, 30910, 100, 200, 300, 400, 500]])).logits
    assert (la - untrained).abs().max().item() > 1e-3  # it did train


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def resume_from_checkpoint(whole: Path, again: Path, processes: int, *extra: str) -> None:
    """Continue a copy of `whole`'s checkpoint-2 to the end; it must end where `whole` ended."""
    again.mkdir()
    shutil.copytree(whole / "checkpoint-2", again / "checkpoint-2")
    resumed = train(again, processes, *extra, "--resume", "auto")
    assert "resuming from" in resumed.stdout
    assert_close(result_tensors(again), result_tensors(whole), atol=1e-6)
    steps = [json.loads(line)["step"] for line in (again / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 4 examples per step; trained once per method for the whole module."""
    done = {}

    def result(method: str) -> Path:
        if method not in done:
            done[method] = tmp_path_factory.mktemp(f"one-{method}")
            train(done[method], 1, "--method", method)
        return done[method]

    return result


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_matches_one_process(tmp_path, method, one_process):
    one = one_process(method)
    fsdp = tmp_path / "fsdp"
    train(fsdp, 2, "--method", method, "--distributed", "fsdp")
    assert (fsdp / "checkpoint-2" / "sharded" / ".metadata").is_file()
    assert_same_model(fsdp, one)
    if method == "lora":  # the sharded save and load are the same code for every method
        resume_from_checkpoint(fsdp, tmp_path / "again", 2, "--method", method, "--distributed", "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("stage,method", [(2, "lora"), (3, "lora"), (3, "full")])
def test_deepspeed_zero_matches_one_process(tmp_path, stage, method, one_process):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    ds_config = json.loads((CONFIGS / f"deepspeed/zero{stage}.json").read_text())
    # The tiny model's weights are all small: without this ZeRO-3 would keep them whole on every process.
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    ds = ["--method", method, "--distributed", "deepspeed", "--deepspeed-config", str(tmp_path / "ds.json")]
    zero = tmp_path / "zero"
    train(zero, 2, *ds)
    assert (zero / "checkpoint-2" / "deepspeed").is_dir()
    assert_same_model(zero, one_process(method))  # full + ZeRO-3: the model gathered from partitions
    if stage == 3 and method == "lora":  # DeepSpeed's own save and load, the same call for every stage
        resume_from_checkpoint(zero, tmp_path / "again", 2, *ds)


def test_strategy_follows_accelerate_and_refuses_contradictions():
    config = load_config(None, {"model": "m", "data": "d", "output": "o"})
    assert choose_strategy(config, 1, environ={}) == "single"
    assert choose_strategy(config, 2, environ={"WORLD_SIZE": "2"}) == "ddp"
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}
    assert choose_strategy(config, 2, environ=env) == "fsdp"
    config.distributed = "deepspeed"
    with pytest.raises(UserError, match="contradicts"):
        choose_strategy(config, 2, environ=env)
    with pytest.raises(UserError, match="torchrun"):
        choose_strategy(config, 1, environ={})
    config.distributed, config.deepspeed_config = "fsdp", "configs/deepspeed/zero2.json"
    with pytest.raises(UserError, match="deepspeed-config"):
        choose_strategy(config, 2, environ={"WORLD_SIZE": "2"})
    config.distributed, config.deepspeed_config = "deepspeed", None
    config.method = "qlora"
    with pytest.raises(UserError, match="qlora"):
        choose_strategy(config, 2, environ={"WORLD_SIZE": "2"})


def test_deepspeed_config_fills_auto_values_and_refuses_its_own_optimizer(tmp_path):
    config = load_config(
        None,
        {"model": "m", "data": "d", "output": "o", "deepspeed_config": str(CONFIGS / "deepspeed/zero3.json")},
    )
    config.batch_size, config.gradient_accumulation_steps = 3, 2
    ds = deepspeed_config(config, 4, torch.bfloat16)
    assert ds["zero_optimization"]["stage"] == 3
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (3, 24)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}')
    config.deepspeed_config = str(bad)
    with pytest.raises(UserError, match="optimizer"):
        deepspeed_config(config, 2, None)
    bad.write_text('{"zero_optimization": {"stage": 2},\n "fp16": }')
    with pytest.raises(UserError, match=f"{bad}:2"):
        deepspeed_config(config, 2, None)


def test_each_process_gets_a_share_or_a_zero_weight_example():
    from types import SimpleNamespace

    from chatglm_sft.train.loop import Dist, Trainer

    for world in (2, 3, 4):
        for n in range(1, 10):
            chunk = list(range(100, 100 + n))
            shares = [Trainer._share(SimpleNamespace(d=Dist(rank=r, world=world)), chunk) for r in range(world)]
            assert [x for mine, w in shares if w == 1.0 for x in mine] == chunk  # all of it, once, in order
            assert all(mine == chunk[:1] for mine, w in shares if w == 0.0)
            assert max(len(m) for m, w in shares if w) - min(len(m) for m, w in shares if w) <= 1
