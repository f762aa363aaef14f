"""Weight-only int8 / int4 quantization for inference."""

from __future__ import annotations

import json

import pytest
import torch

import chatglm_sft
from chatglm_sft.models.quantize import Int4Linear, Int8Linear, weight_bytes
from tests.conftest import TINY, cli, need_shared

TINY_MODELS = ["chatglm-6b-tiny", "chatglm2-6b-tiny", "glm-4-9b-chat-tiny"]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("mode,bound", [("int8", 0.03), ("int4", 0.30)])
def test_logits_close_and_generate_runs(name, mode, bound):
    folder = need_shared(TINY / name)
    reference = chatglm_sft.load_model(folder, dtype=torch.float32)
    model = chatglm_sft.load_model(folder, dtype=torch.float32, quantize=mode)
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert any(isinstance(m, kind) for m in model.modules())
    assert not any(type(m) is torch.nn.Linear and m is not model.get_output_embeddings() for m in model.modules())
    ids = torch.randint(100, 60000, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_l2(model(ids).logits, reference(ids).logits) <= bound
        out = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 19)


def test_memory_of_quantized_layers():
    layer = torch.nn.Linear(1024, 2048, bias=False).to(torch.bfloat16)
    bf16 = weight_bytes(layer)
    assert weight_bytes(Int8Linear(layer)) <= 0.55 * bf16
    assert weight_bytes(Int4Linear(layer, 128)) <= 0.30 * bf16


def test_quantized_with_merged_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = need_shared(TINY / "chatglm2-6b-tiny")
    peft_model = get_peft_model(
        chatglm_sft.load_model(folder, dtype=torch.float32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "lora")
    adapted = chatglm_sft.load_model(folder, dtype=torch.float32, adapter=tmp_path / "lora")
    quantized = chatglm_sft.load_model(folder, dtype=torch.float32, adapter=tmp_path / "lora", quantize="int8")
    ids = torch.tensor([[64790, 64792, 300, 400, 500]])
    with torch.no_grad():
        assert relative_l2(quantized(ids).logits, adapted(ids).logits) <= 0.03


def test_predict_with_quantize(tmp_path):
    folder = need_shared(TINY / "chatglm2-6b-tiny")
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
