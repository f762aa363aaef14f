"""Training end to end: validation, methods, packing, resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import chatglm_sft
from chatglm_sft.errors import UserError
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.train.batching import pack_batch, pad_batch
from chatglm_sft.train.config import load_config
from tests.conftest import cli

HERE = Path(__file__).parent


def train_args(model, data, output, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--max-samples",
        "64",
        "--batch-size",
        "4",
        "--precision",
        "fp32",
        "--output",
        str(output),
        *extra,
    ]


def test_data_check_names_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "a", "output": "b"}\n\n{"instruction": 3, "output": "x"}\nnot json\n'
        '{"instruction": "q", "output": ""}\n'
    )
    result = cli("data", "check", "--data", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}:3:" in result.stdout and "bad: 3" in result.stdout
    array = tmp_path / "bad.json"
    array.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",\n   "output": 5}\n]\n')
    result = cli("data", "check", "--data", str(array))
    assert result.returncode == 1 and f"{array}:3:" in result.stdout


def test_data_check_good_file_passes(tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    result = cli("data", "check", "--data", str(tiny_alpaca), "--model", str(model))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "good: 40" in result.stdout and "tokens per example" in result.stdout


def test_train_refuses_bad_records_then_skips_them(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("chatglm2-6b")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "你好", "output": "你好！"}\n{"instruction": 1}\n' * 4)
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o")]
    args += ["--max-steps", "1", "--batch-size", "2"]
    result = cli(*args)
    assert result.returncode == 1 and f"{data}:2" in result.stderr and "Traceback" not in result.stderr
    result = cli(*args, "--on-bad-record", "skip")
    assert result.returncode == 0, result.stderr
    rejected = (tmp_path / "o" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 4 and json.loads(rejected[0])["line"] == 2


@pytest.mark.slow
def test_full_training_lowers_the_loss(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    out = tmp_path / "O"
    result = cli(
        *train_args(model, tiny_alpaca, out, "--method", "full", "--max-steps", "12", "--learning-rate", "1e-3")
    )
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 13))
    assert sum(e["loss"] for e in log[-3:]) < sum(e["loss"] for e in log[:3])
    assert (out / "loss.png").stat().st_size > 0 and (out / "train_config.yaml").exists()
    assert chatglm_sft.load_model(out).config.chatglm_sft_family == "chatglm2-6b"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_lora_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    lora = ["--method", "lora", "--learning-rate", "5e-3", "--save-steps", "5", "--max-steps", "10"]
    assert cli(*train_args(model, tiny_alpaca, tmp_path / "whole", *lora)).returncode == 0
    cmd = [sys.executable, "-m", "chatglm_sft", *train_args(model, tiny_alpaca, tmp_path / "killed", *lora)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "killed" / "checkpoint-5", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = cli(*train_args(model, tiny_alpaca, tmp_path / "killed", *lora, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert set(whole) == set(again)
    assert max((whole[k] - again[k]).abs().max().item() for k in whole) <= 1e-5
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))

    # The adapter loads through PEFT and through chatglm-sft identically, and it changes the logits.
    ids = torch.tensor([[64790, 64792, 100, 200, 300, 400]])
    with torch.no_grad():
        ours = chatglm_sft.load_model(model, dtype=torch.float32, adapter=tmp_path / "whole")(ids).logits
        peft = PeftModel.from_pretrained(chatglm_sft.load_model(model, dtype=torch.float32), tmp_path / "whole")
        base = chatglm_sft.load_model(model, dtype=torch.float32)(ids).logits
        assert torch.allclose(peft(input_ids=ids).logits, ours, atol=1e-6)
    assert (ours - base).abs().max() > 1e-3


@pytest.mark.slow
def test_lora_and_freeze_on_chatglm6b(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm-6b")
    for method in ("lora", "freeze"):
        result = cli(
            *train_args(
                model,
                tiny_alpaca,
                tmp_path / method,
                "--method",
                method,
                "--max-steps",
                "3",
                "--freeze-trainable-layers",
                "1",
            )
        )
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    chatglm_sft.load_model(model, adapter=tmp_path / "lora")


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
def test_packed_loss_equals_unpacked_loss(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    model = chatglm_sft.load_model(folder, dtype=torch.float32)
    tok = chatglm_sft.load_tokenizer(folder)
    from chatglm_sft.conversation import encode_conversation

    examples = []
    for q, a in [("你好", "你好！"), ("1+1等于几？", "等于2。"), ("写一句诗", "床前明月光，疑是地上霜。")]:
        enc = encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        examples.append((enc.input_ids, enc.labels))
    arch = architecture_of(tok.family)

    def loss(batch):
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )

    with torch.no_grad():
        unpacked = loss(pad_batch(examples, tok.family.pad_id))
        packed_batch = pack_batch(examples, arch, model.config, tok.family.pad_id, row_length=256)
        assert packed_batch["input_ids"].shape[0] == 1
        packed = loss(packed_batch)
    assert abs(packed.item() - unpacked.item()) <= 1e-4 * unpacked.item()


def test_config_recipe_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\noutput: o\nmethod: full\nlearning_rate: 0.001\nlora_targets: [q_proj]\n")
    config = load_config(recipe, {"learning_rate": "2e-4", "max_steps": "7", "packing": "true"})
    assert (config.method, config.learning_rate, config.max_steps, config.packing) == ("full", 2e-4, 7, True)
    assert config.lora_targets == ["q_proj"]
    recipe.write_text("model: m\ndata: d\noutput: o\nlearning_rat: 1\n")
    with pytest.raises(UserError, match="learning_rat"):
        load_config(recipe, {})


def test_shipped_recipes_load():
    for recipe in (HERE.parents[1] / "configs").glob("*.yaml"):
        if recipe.name.startswith(("accelerate", "deepspeed", "fsdp")):
            continue
        load_config(recipe, {"model": "m", "data": "d", "output": "o"})


@pytest.mark.slow
def test_ddp_two_processes(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            *torchrun,
            "-m",
            "chatglm_sft",
            *train_args(model, tiny_alpaca, out, "--method", "lora", "--max-steps", "4", "--batch-size", "2"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "adapter_model.safetensors").exists()
    # Gradients of 2 processes x 2 examples equal 1 process x 4 examples (token-weighted loss).
    script = str(HERE / "ddp_grads.py")
    two = subprocess.run(
        [*torchrun, script, str(model), str(tiny_alpaca), str(tmp_path / "g2"), "2", str(tmp_path / "two.pt")],
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, script, str(model), str(tiny_alpaca), str(tmp_path / "g1"), "4", str(tmp_path / "one.pt")],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    g1, g2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(g1) == set(g2)
    for name in g1:
        # float32 rounding of sums taken in another order scales with the largest entries (see
        # tests/preference/test_preference_distributed.py); a wrong reduction is off by a factor
        scale = g1[name].abs().max().item()
        assert torch.allclose(g1[name], g2[name], atol=1e-4 * scale, rtol=1e-4), name
