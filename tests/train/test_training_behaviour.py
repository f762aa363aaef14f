"""What the training docs promise, checked with real forward and backward passes on the generated tiny checkpoints:
gradient accumulation, packing through the training loss, the learning-rate schedule, held-out evaluation,
checkpoint pruning, freezing and resuming from a given checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatglm_sft.train.config import load_config
from chatglm_sft.train.loop import Trainer, train
from chatglm_sft.train.methods import decoder_layers
from tests.conftest import cli


def settings(model: Path, data: Path, output: Path, **extra) -> dict:
    base = {
        "model": str(model),
        "data": str(data),
        "output": str(output),
        "precision": "fp32",
        "lora_dropout": 0.0,
        "group_by_length": False,
        "seed": 7,
    }
    return base | extra


def trainer(model, data, output, **extra) -> Trainer:
    return Trainer(load_config(None, settings(model, data, output, **extra)))


def run(model, data, output, **extra) -> Path:
    """`chatglm-sft train` with this module's `settings` and `extra`, as a call; returns the output folder."""
    return train(load_config(None, settings(model, data, output, **extra)))


def gradients(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    """Equal up to float32 summation order: each tensor within `rel` of its largest entry."""
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max() <= rel * b[name].abs().max(), name


def log_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_checkpoint, tiny_alpaca, family):
    model = tiny_checkpoint(family)
    results = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        t = trainer(
            model,
            tiny_alpaca,
            tmp_path / f"b{batch}",
            method="full",
            batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        loss, tokens = t.train_step(0)
        results[batch] = loss, tokens, gradients(t)
    big_loss, big_tokens, big = results[4]
    assert big and big_tokens > 0
    for batch in (2, 1):
        loss, tokens, grads = results[batch]
        assert tokens == big_tokens and math.isclose(loss, big_loss, rel_tol=1e-5)
        assert_same_gradients(grads, big, rel=1e-5)


def test_token_weighted_loss_is_the_mean_over_answer_tokens(tmp_path, tiny_checkpoint, tiny_alpaca):
    """Examples with long answers weigh more than short ones: the step's loss is the mean over all answer tokens,
    not the mean of the micro-batches' means."""
    t = trainer(
        tiny_checkpoint("chatglm2-6b"), tiny_alpaca, tmp_path / "o", batch_size=1, gradient_accumulation_steps=4
    )
    loss, tokens = t.train_step(0)
    micro, _ = t.step_examples(0)
    sums, counts = [], []
    with torch.no_grad():
        for examples, _ in micro:
            sums.append(t.loss_sum(t.model, t.tensors(examples)).item())
            counts.append(sum(1 for y in examples[0][1][1:] if y != -100))
    assert tokens == sum(counts) and len(set(counts)) > 1
    assert math.isclose(loss, sum(sums) / sum(counts), rel_tol=1e-5)
    assert not math.isclose(loss, sum(s / c for s, c in zip(sums, counts, strict=True)) / 4, rel_tol=1e-3)


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
def test_packing_gives_the_same_training_loss_and_gradients(tmp_path, tiny_checkpoint, tiny_alpaca, family):
    model = tiny_checkpoint(family)
    results = {}
    for packing in (False, True):
        t = trainer(model, tiny_alpaca, tmp_path / str(packing), method="lora", batch_size=4, packing=packing)
        micro, _ = t.step_examples(0)
        rows = t.tensors(micro[0][0])["input_ids"].shape[0]
        loss, tokens = t.train_step(0)
        results[packing] = loss, tokens, gradients(t), rows
    (loss, tokens, grads, rows), (p_loss, p_tokens, p_grads, p_rows) = results[False], results[True]
    assert rows == 4 and p_rows < rows  # packing really put several examples in a row
    assert p_tokens == tokens and math.isclose(p_loss, loss, rel_tol=1e-5)
    assert_same_gradients(p_grads, grads, rel=1e-5)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_learning_rate_schedule_at_warmup_end_and_at_the_end(tmp_path, tiny_checkpoint, tiny_alpaca, scheduler):
    peak, warmup, total = 1e-3, 3, 8
    out = run(
        tiny_checkpoint("chatglm2-6b"),
        tiny_alpaca,
        tmp_path / "o",
        batch_size=2,
        max_steps=total,
        learning_rate=peak,
        warmup_steps=warmup,
        lr_scheduler=scheduler,
    )
    rates = [e["learning_rate"] for e in log_of(out)]
    assert len(rates) == total
    # Linear warm-up reaching the peak on the last warm-up step ...
    assert rates[:warmup] == pytest.approx([peak * (k + 1) / warmup for k in range(warmup)])
    # ... then the schedule over the remaining steps; the last step uses the last value before zero.
    after = [(s - warmup) / (total - warmup) for s in range(warmup, total)]
    expected = {
        "cosine": [peak * 0.5 * (1 + math.cos(math.pi * p)) for p in after],
        "linear": [peak * (1 - p) for p in after],
        "constant": [peak] * (total - warmup),
    }[scheduler]
    assert rates[warmup:] == pytest.approx(expected)
    assert rates[warmup] == pytest.approx(peak)
    if scheduler != "constant":
        assert rates[-1] < rates[warmup] / 4


@pytest.mark.slow
def test_eval_split_and_eval_steps(tmp_path, tiny_checkpoint, tiny_alpaca):
    out = run(
        tiny_checkpoint("chatglm2-6b"),
        tiny_alpaca,
        tmp_path / "o",
        batch_size=4,
        max_steps=5,
        eval_split=0.25,
        eval_steps=2,
        learning_rate=1e-3,
        method="full",
    )
    log = log_of(out)
    evals = [e for e in log if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps, and once at the end
    assert all(math.isfinite(e["eval_loss"]) for e in evals)
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]
    t = trainer(tiny_checkpoint("chatglm2-6b"), tiny_alpaca, tmp_path / "t", eval_split=0.25)
    assert (len(t.train_set), len(t.eval_set)) == (30, 10)
    held_out = {tuple(x) for x, _ in t.eval_set}
    assert not held_out & {tuple(x) for x, _ in t.train_set}  # held-out records are never trained on
    only_end = run(tiny_checkpoint("chatglm2-6b"), tiny_alpaca, tmp_path / "e", max_steps=3, eval_split=0.25)
    assert [e["step"] for e in log_of(only_end) if "eval_loss" in e] == [3]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, tiny_checkpoint, tiny_alpaca):
    out = run(
        tiny_checkpoint("chatglm2-6b"),
        tiny_alpaca,
        tmp_path / "o",
        batch_size=2,
        max_steps=5,
        save_steps=1,
        save_total_limit=2,
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
@pytest.mark.parametrize("layers", [1, 2])
def test_freeze_trains_exactly_the_last_layers(tmp_path, tiny_checkpoint, tiny_alpaca, family, layers):
    t = trainer(
        tiny_checkpoint(family, layers=3),
        tiny_alpaca,
        tmp_path / "o",
        method="freeze",
        freeze_trainable_layers=layers,
        learning_rate=1e-2,
    )
    blocks = decoder_layers(t.model)
    assert len(blocks) == 3
    expected = {n for n, _ in t.model.named_parameters() if any(f"layers.{i}." in n for i in range(3 - layers, 3))}
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == expected and expected
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert t.optimizer_step(t.train_step(0)[0])
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= expected and len(changed) >= len(expected) // 2  # a real step moved only the unfrozen layers


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_folder(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    common = ["--model", str(model), "--data", str(tiny_alpaca), "--precision", "fp32", "--batch-size", "2"]
    common += ["--max-steps", "4", "--learning-rate", "5e-3", "--lora-dropout", "0", "--save-steps", "2"]
    whole = cli("train", *common, "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    resumed = cli(
        "train", *common, "--output", str(tmp_path / "again"), "--resume", str(tmp_path / "whole" / "checkpoint-2")
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [e["step"] for e in log_of(tmp_path / "again")] == [1, 2, 3, 4]
    missing = cli("train", *common, "--output", str(tmp_path / "x"), "--resume", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "nothing" in missing.stderr
