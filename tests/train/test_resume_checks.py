"""Resume reads no pickles, and refuses a checkpoint written by a different kind of run, naming each difference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chatglm_sft.errors import UserError
from chatglm_sft.train.config import load_config


@pytest.fixture
def run(tmp_path, tiny_checkpoint, tiny_alpaca):
    """`run(**changes) -> Trainer` over one output folder; the first call trains 2 steps with a checkpoint each."""
    from chatglm_sft.train.loop import Trainer

    base = {
        "model": str(tiny_checkpoint("chatglm2-6b")),
        "data": str(tiny_alpaca),
        "output": str(tmp_path / "out"),
        "max_samples": 12,
        "batch_size": 2,
        "max_length": 96,
        "precision": "fp32",
        "max_steps": 2,
        "save_steps": 1,
        "resume": "auto",
    }

    def make(**changes):
        return Trainer(load_config(None, base | changes))

    make(max_steps=2, save_steps=1).run()
    return make


def test_resume_loads_tensors_and_plain_values_only(run, monkeypatch):
    real_load = torch.load

    def load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "a checkpoint file was read as a pickle"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    trainer = run(max_steps=3)
    trainer.run()
    state = json.loads((trainer.out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and trainer.state.step == 3


def test_resume_refuses_another_run_and_names_every_difference(run, tmp_path, tiny_alpaca):
    with pytest.raises(UserError) as refused:
        run(max_steps=3, batch_size=3, gradient_accumulation_steps=2).run()
    message = str(refused.value)
    assert "--batch-size 2 -> 3" in message and "--gradient-accumulation-steps 1 -> 2" in message
    assert "--method" not in message and "data file" not in message

    other_data = tmp_path / "other.json"
    records = json.loads(tiny_alpaca.read_text(encoding="utf-8"))
    other_data.write_text(json.dumps(records[::-1], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match=r"data file content [0-9a-f]+ -> [0-9a-f]+"):
        run(max_steps=3, data=str(other_data)).run()
    with pytest.raises(UserError, match=r"--method lora -> full"):
        run(max_steps=3, method="full").run()


def test_resume_refuses_another_model(run, tmp_path, tiny_checkpoint):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint("chatglm2-6b"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"layernorm_epsilon": 1e-6}))
    with pytest.raises(UserError, match=r"cannot resume from .*checkpoint-1: .*model files"):
        run(max_steps=3, model=str(other)).run()
