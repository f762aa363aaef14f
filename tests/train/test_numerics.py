"""A step whose loss or gradients are not all finite is skipped: weights, optimizer state and learning-rate schedule
stay bit-identical, the log and the progress bar count it, and too many in a row stop the run naming the step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatglm_sft.errors import UserError
from chatglm_sft.train.config import load_config


def make_trainer(tmp_path, tiny_checkpoint, tiny_alpaca, **extra):
    from chatglm_sft.train.loop import Trainer

    settings = {
        "model": str(tiny_checkpoint("chatglm2-6b")),
        "data": str(tiny_alpaca),
        "output": str(tmp_path / "out"),
        "max_samples": 16,
        "batch_size": 2,
        "max_length": 96,
        "precision": "fp32",
        "learning_rate": 1e-2,
        "max_skipped_steps": 2,
    }
    return Trainer(load_config(None, settings | extra))


def snapshot(trainer) -> tuple:
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    optimizer = trainer.optimizer.state_dict()
    optimizer = {
        "state": {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer["state"].items()},
        "param_groups": json.dumps(optimizer["param_groups"], default=str),
    }
    return weights, optimizer, trainer.scheduler.state_dict()["last_epoch"], trainer.scheduler.get_last_lr()


def assert_identical(a: tuple, b: tuple) -> None:
    (wa, oa, ea, la), (wb, ob, eb, lb) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        assert all(torch.equal(oa["state"][k][n], ob["state"][k][n]) for n in oa["state"][k])
    assert (ea, la) == (eb, lb)


def poison_a_gradient(trainer, value: float) -> None:
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "the backward pass produced no gradients"
    grads[len(grads) // 2].view(-1)[0] = value


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_leaves_weights_optimizer_and_schedule_untouched(
    tmp_path, tiny_checkpoint, tiny_alpaca, bad
):
    trainer = make_trainer(tmp_path, tiny_checkpoint, tiny_alpaca)
    loss, _ = trainer.train_step(0)
    assert trainer.optimizer_step(loss) is True  # the optimizer now has state to spoil
    before = snapshot(trainer)
    loss, _ = trainer.train_step(1)  # a real backward pass
    assert math.isfinite(loss)
    poison_a_gradient(trainer, bad)
    assert trainer.optimizer_step(loss) is False
    assert_identical(before, snapshot(trainer))
    assert all(p.grad is None for p in trainer.model.parameters())  # the bad gradients are gone
    assert trainer.state.skipped_steps == 1
    loss, _ = trainer.train_step(2)  # and the next step trains normally
    assert trainer.optimizer_step(loss) is True
    assert not torch.equal(next(iter(before[0].values())), next(iter(snapshot(trainer)[0].values())))


def test_skipped_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, tiny_checkpoint, tiny_alpaca):
    trainer = make_trainer(tmp_path, tiny_checkpoint, tiny_alpaca)
    before = snapshot(trainer)
    for _ in range(2):
        trainer.train_step(0)
        poison_a_gradient(trainer, float("nan"))
        assert trainer.optimizer_step(1.0) is False
    with pytest.raises(UserError, match=r"step \d+: the loss was NaN/Inf, and 3 steps in a row were skipped"):
        trainer.optimizer_step(float("nan"))
    assert_identical(before, snapshot(trainer))


def test_a_skipped_step_is_logged_and_counted(tmp_path, tiny_checkpoint, tiny_alpaca, capsys):
    trainer = make_trainer(tmp_path, tiny_checkpoint, tiny_alpaca, max_steps=3)
    real_step = trainer.train_step

    def train_step(step):
        result = real_step(step)
        if step == 1:
            poison_a_gradient(trainer, float("nan"))
        return result

    trainer.train_step = train_step
    trainer.run()
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "skipped": "a gradient was NaN/Inf"} in log
    assert [e["step"] for e in log if "loss" in e] == [1, 3]
    assert trainer.scheduler.state_dict()["last_epoch"] == 2  # the schedule advanced for applied steps only
    assert "3 steps, 1 skipped" in capsys.readouterr().out
