"""Quantized weights: the output layer too, greedy decoding stays close to float, and `export --quantize` writes a
folder that loads without quantizing again and computes what quantizing at load computes."""

from __future__ import annotations

import pytest
import torch

import chatglm_sft
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.models import quantize
from tests.conftest import cli

PROMPTS = ["你好，请介绍一下你自己。", "Write a short poem about the sea.", "1+1等于几？", "列出三种水果。"]


def greedy_tokens(model, tokenizer, n: int = 16) -> list[list[int]]:
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    steps = engine.decode_steps(prompts, SamplingParams(max_new_tokens=n))
    return torch.stack(list(steps), dim=1).tolist()


def teacher_forced_agreement(model, reference, seq: torch.Tensor, start: int) -> float:
    """Share of positions where `model` picks the token `reference` picks on the same prefix."""
    with torch.no_grad():
        ours, theirs = (m(seq).logits[0, start - 1 : -1].argmax(-1) for m in (model, reference))
    return (ours == theirs).float().mean().item()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_output_layer_quantized_and_greedy_agreement_high(tiny_checkpoint, mode):
    folder = tiny_checkpoint("chatglm2-6b", hidden=128, head_dim=32, ffn=256)
    tokenizer = chatglm_sft.load_tokenizer(folder)
    reference = chatglm_sft.load_model(folder, dtype=torch.float32)
    prompt = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        seq = reference.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    whole = chatglm_sft.load_model(folder, dtype=torch.float32, quantize=mode)
    kind = quantize.Int8Linear if mode == "int8" else quantize.Int4Linear
    assert isinstance(whole.get_output_embeddings(), kind)
    # What quantizing the output layer adds, alone: the greedy choices hardly move.
    output_only = chatglm_sft.load_model(folder, dtype=torch.float32)
    layer = output_only.get_output_embeddings()
    output_only.lm_head = quantize.Int8Linear(layer) if mode == "int8" else quantize.Int4Linear(layer, 128)
    assert teacher_forced_agreement(output_only, reference, seq, prompt.shape[1]) >= (0.95 if mode == "int8" else 0.85)
    if mode == "int8":  # int4 of a tiny random model's every layer is too coarse to keep its greedy path
        assert teacher_forced_agreement(whole, reference, seq, prompt.shape[1]) >= 0.9


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_export_quantized_loads_without_quantizing_and_equals_quantize_at_load(
    tiny_checkpoint, tmp_path, monkeypatch, mode
):
    folder = tiny_checkpoint("chatglm2-6b")
    out = tmp_path / "exported"
    result = cli("export", "--model", str(folder), "--output", str(out), "--quantize", mode)
    assert result.returncode == 0, result.stderr
    at_load = chatglm_sft.load_model(folder, dtype=torch.float32, quantize=mode)

    def no_quantizing(*args, **kwargs):
        raise AssertionError("the exported model was quantized again at load")

    monkeypatch.setattr(quantize, "int4_codes", no_quantizing)
    monkeypatch.setattr(quantize, "int8_codes", no_quantizing)
    loaded = chatglm_sft.load_model(out, dtype=torch.float32)
    assert loaded.config.chatglm_sft_quantization == mode
    saved_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    float_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert saved_bytes < 0.7 * float_bytes  # the float32 embedding table, half of the tiny model, stays
    ids = torch.tensor([chatglm_sft.load_tokenizer(out).encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, at_load(ids).logits)
    tokenizer = chatglm_sft.load_tokenizer(out)
    assert greedy_tokens(loaded, tokenizer, 8) == greedy_tokens(at_load, tokenizer, 8)


def test_export_quantized_refuses_thudm_format(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("chatglm2-6b")
    result = cli(
        "export", "--model", str(folder), "--output", str(tmp_path / "o"), "--format", "thudm", "--quantize", "int8"
    )
    assert result.returncode != 0 and "hf format only" in result.stderr
