"""A P-Tuning v2 prefix through `export` and `--quantize`: THUDM's layout keeps the prefix beside the weights (and
loads back to the same outputs), the HF format refuses with a way to serve it, and int8/int4 keep the prefix in
floating point."""

from __future__ import annotations

import json

import pytest
import torch

import chatglm_sft
from chatglm_sft.families import get_family
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.models.quantize import Int8Linear
from chatglm_sft.train.methods import save_prefix
from tests.conftest import cli

FAMILIES = ["chatglm2-6b", "chatglm-6b"]


@pytest.fixture(params=FAMILIES)
def prefix(request, tmp_path, tiny_checkpoint):
    """(base folder, P-Tuning folder with a random prefix of 4 virtual tokens, family)."""
    family = get_family(request.param)
    base = tiny_checkpoint(request.param)
    arch = architecture_of(family)
    model = arch.add_prefix(chatglm_sft.load_model(base, dtype="float32"), 4, False)
    encoder = model.get_submodule(arch.prefix_module)
    with torch.no_grad():
        encoder.embedding.weight.normal_(std=1.0)
    folder = tmp_path / "ptuning"
    folder.mkdir()
    state = {f"{arch.prefix_module}.{k}": v for k, v in encoder.state_dict().items()}
    save_prefix(model, folder, str(base), family, state)
    return base, folder, family


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_thudm_export_keeps_the_prefix_and_loads_back_the_same(prefix, tmp_path):
    base, ptuning, family = prefix
    out = tmp_path / "exported"
    result = cli("export", "--model", str(base), "--adapter", str(ptuning), "--output", str(out), "--format", "thudm")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["pre_seq_len"], config["prefix_projection"]) == (4, False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    adapted = chatglm_sft.load_model(base, dtype="float32", adapter=ptuning)
    exported = chatglm_sft.load_model(out, dtype="float32")
    plain = chatglm_sft.load_model(base, dtype="float32")
    assert (logits(exported, ids) - logits(adapted, ids)).abs().max() <= 1e-5
    assert (logits(exported, ids) - logits(plain, ids)).abs().max() > 1e-3  # the prefix is there


def test_hf_export_of_a_prefix_says_how_to_serve_it(prefix, tmp_path):
    base, ptuning, _ = prefix
    result = cli("export", "--model", str(base), "--adapter", str(ptuning), "--output", str(tmp_path / "hf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot be merged into weights" in result.stderr and "--format thudm" in result.stderr
    assert f"--adapter {ptuning}" in result.stderr


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_keeps_the_prefix_in_floating_point(prefix, mode):
    base, ptuning, family = prefix
    model = chatglm_sft.load_model(base, dtype="float32", adapter=ptuning, quantize=mode)
    encoder = model.get_submodule(architecture_of(family).prefix_module)
    assert encoder.embedding.weight.dtype == torch.float32
    assert any(isinstance(m, Int8Linear) for m in model.modules()) or mode == "int4"
    ids = torch.tensor([[5, 6, 7, 8]])
    adapted = chatglm_sft.load_model(base, dtype="float32", adapter=ptuning)
    assert torch.isfinite(logits(model, ids)).all()
    assert (logits(model, ids) - logits(adapted, ids)).abs().max() < 0.5 * logits(adapted, ids).abs().max()


def test_predict_with_a_prefix_and_quantize(prefix, tmp_path):
    base, ptuning, _ = prefix
    data = tmp_path / "q.jsonl"
    data.write_text('{"instruction": "你好"}\n', encoding="utf-8")
    out = tmp_path / "p.jsonl"
    args = ["--data", str(data), "--output", str(out), "--max-new-tokens", "3"]
    result = cli("predict", "--model", str(base), "--adapter", str(ptuning), "--quantize", "int8", *args)
    assert result.returncode == 0, result.stderr
    assert "response" in json.loads(out.read_text())
