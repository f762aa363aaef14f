"""Weight-only int8 / int4 quantization for inference."""

from __future__ import annotations

import json

import pytest
import torch

import chatglm_sft
from chatglm_sft.models.quantize import Int4Linear, Int8Linear, weight_bytes
from tests.conftest import TINY, cli, need_shared

REFERENCE_MODELS = ["chatglm-6b-tiny", "chatglm2-6b-tiny", "glm-4-9b-chat-tiny"]
FAMILIES = ["chatglm-6b", "chatglm2-6b", "glm-4-9b-chat"]
# What docs/inference.md claims: logits within 1.5% (int8) and 23% (int4) relative L2 of float32 on THUDM's tiny
# reference checkpoints; within 3% and 35% on the generated ones the test suite builds (random weights at
# 1/sqrt(fan-in), a harder case: no structure, and every layer's error compounds).
REFERENCE_BOUNDS = {"int8": 0.015, "int4": 0.23}
GENERATED_BOUNDS = {"int8": 0.03, "int4": 0.35}


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_quantized(folder, mode, bound):
    reference = chatglm_sft.load_model(folder, dtype=torch.float32)
    model = chatglm_sft.load_model(folder, dtype=torch.float32, quantize=mode)
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert any(isinstance(m, kind) for m in model.modules())
    assert not any(type(m) is torch.nn.Linear and m is not model.get_output_embeddings() for m in model.modules())
    ids = torch.randint(100, 60000, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = relative_l2(model(ids).logits, reference(ids).logits)
        out = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert error <= bound, error
    assert out.shape == (1, 19)


@pytest.mark.parametrize("name", REFERENCE_MODELS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_logits_on_reference_checkpoints_within_the_documented_bound(name, mode):
    check_quantized(need_shared(TINY / name), mode, REFERENCE_BOUNDS[mode])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_logits_close_and_generate_runs(tiny_checkpoint, family, mode):
    check_quantized(tiny_checkpoint(family), mode, GENERATED_BOUNDS[mode])


def test_memory_of_quantized_layers():
    layer = torch.nn.Linear(1024, 2048, bias=False).to(torch.bfloat16)
    bf16 = weight_bytes(layer)
    assert weight_bytes(Int8Linear(layer)) <= 0.55 * bf16
    assert weight_bytes(Int4Linear(layer, 128)) <= 0.30 * bf16


@pytest.mark.parametrize("mode,kept", [("int8", 0.05), ("int4", 0.35)])
def test_quantized_model_keeps_the_adapters_effect(tmp_path, tiny_checkpoint, mode, kept):
    from peft import LoraConfig, get_peft_model

    folder = tiny_checkpoint("chatglm2-6b")
    # The adapter is random: over seeds 0-7 the int4 error is 18-34% of its effect (the same with PyTorch's int4
    # kernel and ours), so an unseeded draw made the result depend on which tests ran before in the process.
    torch.manual_seed(0)
    peft_model = get_peft_model(
        chatglm_sft.load_model(folder, dtype=torch.float32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "lora")
    base = chatglm_sft.load_model(folder, dtype=torch.float32)
    adapted = chatglm_sft.load_model(folder, dtype=torch.float32, adapter=tmp_path / "lora")
    quantized = chatglm_sft.load_model(folder, dtype=torch.float32, adapter=tmp_path / "lora", quantize=mode)
    ids = torch.tensor([[64790, 64792, 300, 400, 500, 600, 700]])
    with torch.no_grad():
        base_logits, adapted_logits, quantized_logits = (m(ids).logits for m in (base, adapted, quantized))
    effect = adapted_logits - base_logits
    assert relative_l2(effect, base_logits) > 0.3  # the adapter changes the model a lot
    # ... and quantizing the merged model keeps that change: its error is a small part of the adapter's effect.
    assert relative_l2(quantized_logits - base_logits, effect) <= kept


def test_predict_with_quantize(tmp_path, tiny_checkpoint):
    folder = tiny_checkpoint("chatglm2-6b")
    data = tmp_path / "in.jsonl"
    data.write_text('{"instruction": "你好"}\n{"instruction": "1+1="}\n')
    result = cli(
        "predict",
        "--model",
        str(folder),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--quantize",
        "int8",
        "--max-new-tokens",
        "6",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("response" in r for r in rows)
