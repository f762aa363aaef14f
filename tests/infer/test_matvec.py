"""The engine's one-row matrix-vector path for bf16 linear layers on the CPU: same results as `F.linear` up to bf16
rounding, the same greedy tokens, and nothing changed for float32 models or multi-row inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import chatglm_sft
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.models.matvec import MatVecLinear, use_matvec_kernels


@pytest.mark.parametrize("bias", [True, False])
def test_one_row_matches_linear_within_bf16_rounding(bias):
    torch.manual_seed(0)
    plain = nn.Linear(256, 384, bias=bias).to(torch.bfloat16)
    fast = copy.deepcopy(plain)
    assert use_matvec_kernels(fast) == 1 and type(fast) is MatVecLinear
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    exact = x.double() @ plain.weight.double().T + (plain.bias.double() if bias else 0)
    got, reference = fast(x), plain(x)
    assert got.shape == reference.shape == (1, 1, 384) and got.dtype == torch.bfloat16
    # Both are the float64 result rounded to bf16, give or take one step of bf16 (2^-8 relative).
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()
    assert (got.double() - reference.double()).abs().max() <= exact.abs().max() * 2**-7
    rows = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(fast(rows), plain(rows))  # several rows: F.linear itself


def test_only_bf16_cpu_linear_layers_change(tiny_checkpoint):
    folder = tiny_checkpoint("chatglm2-6b")
    fp32 = chatglm_sft.load_model(folder, dtype="float32")
    assert use_matvec_kernels(fp32) == 0
    bf16 = chatglm_sft.load_model(folder, dtype="bfloat16")
    keys = list(bf16.state_dict())
    linear = sum(type(m) is nn.Linear for m in bf16.modules())
    assert use_matvec_kernels(bf16) == linear > 0
    assert list(bf16.state_dict()) == keys


@pytest.mark.parametrize("family", ["chatglm2-6b", "glm-4-9b-chat", "chatglm-6b"])
def test_greedy_tokens_unchanged_in_bf16(tiny_checkpoint, monkeypatch, family):
    folder = tiny_checkpoint(family)
    tokenizer = chatglm_sft.load_tokenizer(folder)
    messages = [{"role": "user", "content": "你好，请介绍一下你自己"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    params = SamplingParams(max_new_tokens=16)
    fast = Engine(chatglm_sft.load_model(folder, dtype="bfloat16"), tokenizer)
    assert any(isinstance(m, MatVecLinear) for m in fast.model.modules())
    monkeypatch.setattr("chatglm_sft.infer.engine.use_matvec_kernels", lambda model: 0)
    plain = Engine(chatglm_sft.load_model(folder, dtype="bfloat16"), tokenizer)
    assert not any(isinstance(m, MatVecLinear) for m in plain.model.modules())
    assert fast.generate([prompt], params)[0].token_ids == plain.generate([prompt], params)[0].token_ids
