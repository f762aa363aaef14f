"""ChatGLM-6B (v1): our model against THUDM's outputs, padding, cache, gradient checkpointing, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import chatglm_sft
from chatglm_sft.models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM, position_ids_from_ids
from tests.conftest import TINY, TOKENIZE, need_shared, write_checkpoint
from tests.models.test_glm_loading import expand_logits

GMASK, SOP, EOP, PAD = 130001, 130004, 130005, 3


def tiny_config(**kw) -> ChatGLMv1Config:
    base = dict(
        vocab_size=130528,
        hidden_size=48,
        num_layers=3,
        num_attention_heads=6,
        inner_hidden_size=96,
        max_sequence_length=256,
    )
    return ChatGLMv1Config(**(base | kw))


def random_model(seed=0, **kw) -> ChatGLMv1ForCausalLM:
    torch.manual_seed(seed)
    return ChatGLMv1ForCausalLM(tiny_config(**kw)).eval()


@pytest.fixture(scope="module")
def golden():
    folder = need_shared(TINY / "chatglm-6b-tiny")
    return chatglm_sft.load_model(folder, dtype=torch.float32), load_file(folder / "expected.safetensors")


@pytest.mark.parametrize("prefix", ["prompt", "train", "mask"])
def test_golden_logits(golden, prefix):
    model, exp = golden
    with torch.no_grad():
        diff, lse, argmax = expand_logits(exp, prefix, model(exp[f"{prefix}_input_ids"]).logits)
    assert diff <= 1e-4 and lse <= 1e-4 and argmax


def test_golden_loss_and_greedy(golden):
    model, exp = golden
    with torch.no_grad():
        loss = model(exp["train_input_ids"], labels=exp["train_labels"]).loss.item()
        assert abs(loss - exp["train_loss"].item()) <= 1e-5 * exp["train_loss"].item()
        for use_cache in (True, False):
            out = model.generate(
                exp["greedy_prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache
            )
            assert out[0, 12:].tolist() == exp["greedy_tokens"].tolist()


def test_other_shape_and_bin_shards_reload(tmp_path):
    model = random_model(seed=1)
    state = {k: v.half() for k, v in model.state_dict().items()}
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "position_encoding_2d": True,
        "torch_dtype": "float16",
    } | {
        k: getattr(model.config, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "inner_hidden_size",
            "max_sequence_length",
        )
    }
    for i in range(model.config.num_layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2, dtype=torch.float16)
    folder = write_checkpoint(tmp_path / "v1", config, state, fmt="bin", shards=3)
    loaded = chatglm_sft.load_model(folder, dtype=torch.float32)
    ids = torch.tensor([[20, 30, 40, 50, GMASK, SOP, 60, 70]])
    reference = model.half().float()
    with torch.no_grad():
        assert (loaded(ids).logits - reference(ids).logits).abs().max() <= 1e-5


def test_positions_match_official_batch_padding():
    data = json.loads((need_shared(TOKENIZE) / "chatglm-6b.batch_padding.json").read_text())
    ids = torch.tensor(data["input_ids"])
    mask = (ids != PAD).long()
    config = ChatGLMv1Config()
    assert position_ids_from_ids(ids, config, mask).tolist() == data["position_ids"]


def _two_prompts():
    long = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18, 19, GMASK, SOP]])
    short = torch.tensor([[21, 22, 23, GMASK, SOP]])
    batch = torch.cat([long, torch.cat([torch.full((1, 6), PAD), short], 1)])
    mask = (batch != PAD).long()
    return long, short, batch, mask


def test_padded_batch_equals_single_rows():
    model = random_model()
    long, short, batch, mask = _two_prompts()
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        assert (logits[1, 6:] - model(short).logits[0]).abs().max() <= 1e-4
        assert (logits[0] - model(long).logits[0]).abs().max() <= 1e-4
        batched = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        single = model.generate(short, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = model.generate(short, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert batched[1, 11:].tolist() == single[0, 5:].tolist() == uncached[0, 5:].tolist()


def test_explicit_positions_and_generation_modes():
    model = random_model()
    long, *_ = _two_prompts()
    with torch.no_grad():
        implicit = model(long).logits
        explicit = model(long, position_ids=position_ids_from_ids(long, model.config)).logits
        assert torch.equal(implicit, explicit)
        assert model.generate(long, max_new_tokens=4, num_beams=3, do_sample=False).shape == (1, 15)
        assert model.generate(long, max_new_tokens=4, do_sample=True, num_return_sequences=2).shape == (2, 15)


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.tensor([[11, 12, 13, GMASK, SOP, 30, 31, 32, EOP]])
    labels = ids.clone()
    labels[:, :5] = -100
    grads, attention_calls = [], []
    for checkpointing in (False, True):
        model = random_model(seed=4).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls = []
        model.transformer.layers[0].attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model(ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        attention_calls.append(len(calls))
    assert attention_calls == [1, 2]  # the checkpointed layer really runs again in backward
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_peft_lora_forward_backward():
    model = random_model()
    lora = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    )
    ids = torch.tensor([[11, 12, GMASK, SOP, 30, 31, EOP]])
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    model = random_model().to(dtype)
    long, *_ = _two_prompts()
    with torch.no_grad():
        logits = model(long).logits.float()
        reference = random_model()(long).logits
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.1


def test_saved_folder_loads_with_auto_classes(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    long, *_ = _two_prompts()
    with torch.no_grad():
        assert torch.equal(again(long).logits, model(long).logits)
    assert isinstance(chatglm_sft.load_model(tmp_path / "saved"), ChatGLMv1ForCausalLM)
