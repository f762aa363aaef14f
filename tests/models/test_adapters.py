"""PEFT adapters load onto chatglm-sft models and change their outputs; mismatches are clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import chatglm_sft
from chatglm_sft.errors import UserError
from chatglm_sft.models.export import export_model
from tests.conftest import random_thudm_glm_state, thudm_glm_config, write_checkpoint


@pytest.fixture
def base(tmp_path):
    config = thudm_glm_config(vocab=400)
    return write_checkpoint(tmp_path / "base", config, random_thudm_glm_state(config))


def _save_adapter(base, out, targets):
    model = chatglm_sft.load_model(base, dtype=torch.float32, family="chatglm2-6b")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.save_pretrained(out)


def test_adapter_loads_merges_and_exports(base, tmp_path):
    _save_adapter(base, tmp_path / "lora", ["q_proj", "v_proj"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain = chatglm_sft.load_model(base, dtype=torch.float32, family="chatglm2-6b")
    adapted = chatglm_sft.load_model(base, dtype=torch.float32, family="chatglm2-6b", adapter=tmp_path / "lora")
    with torch.no_grad():
        assert (adapted(ids).logits - plain(ids).logits).abs().max() > 1e-3
        export_model(base, tmp_path / "merged", adapter=tmp_path / "lora", family="chatglm2-6b")
        merged = chatglm_sft.load_model(tmp_path / "merged", dtype=torch.float32)
        assert (merged(ids).logits - adapted(ids).logits).abs().max() <= 1e-4


def test_adapter_for_other_modules_is_a_clear_error(base, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["c_attn"]}')
    with pytest.raises(UserError, match="c_attn"):
        chatglm_sft.load_model(base, family="chatglm2-6b", adapter=tmp_path / "bad")
    with pytest.raises(UserError, match="not a PEFT adapter"):
        chatglm_sft.load_model(base, family="chatglm2-6b", adapter=tmp_path)


def test_thudm_layout_lora_equals_merged_thudm_checkpoint(tmp_path):
    """A LoRA saved against THUDM's fused query_key_value loads onto q/k/v exactly."""
    import json

    from safetensors.torch import save_file

    config = thudm_glm_config(vocab=400)
    state = {k: v.float() for k, v in random_thudm_glm_state(config).items()}
    base = write_checkpoint(tmp_path / "base", config, state)
    r, alpha, hidden = 4, 16, config["hidden_size"]
    rows = state["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape[0]
    g = torch.Generator().manual_seed(7)
    adapter, merged = {}, dict(state)
    for i in range(config["num_layers"]):
        name = f"transformer.encoder.layers.{i}.self_attention.query_key_value"
        a, b = torch.randn(r, hidden, generator=g) * 0.3, torch.randn(rows, r, generator=g) * 0.3
        adapter[f"base_model.model.{name}.lora_A.weight"] = a
        adapter[f"base_model.model.{name}.lora_B.weight"] = b
        merged[f"{name}.weight"] = state[f"{name}.weight"] + (alpha / r) * b @ a
    lora = tmp_path / "thudm_lora"
    lora.mkdir()
    save_file(adapter, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": ["query_key_value"],
                "task_type": "CAUSAL_LM",
            }
        )
    )
    reference = write_checkpoint(tmp_path / "merged_thudm", {**config, "torch_dtype": "float32"}, merged)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        ours = chatglm_sft.load_model(base, dtype=torch.float32, family="chatglm2-6b", adapter=lora)(ids).logits
        expected = chatglm_sft.load_model(reference, dtype=torch.float32, family="chatglm2-6b")(ids).logits
        plain = chatglm_sft.load_model(base, dtype=torch.float32, family="chatglm2-6b")(ids).logits
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-2


def test_adapter_with_wrong_shapes_is_a_clear_error(base, tmp_path):
    _save_adapter(base, tmp_path / "lora", ["q_proj"])
    other = tmp_path / "other"
    config = thudm_glm_config(vocab=400, hidden=64, kv_channels=8, heads=8)
    write_checkpoint(other, config, random_thudm_glm_state(config))
    with pytest.raises(UserError, match="does not fit"):
        chatglm_sft.load_model(other, family="chatglm2-6b", adapter=tmp_path / "lora")


def test_loading_an_adapter_prints_no_deprecation_from_peft(base, tmp_path):
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every wrap; users saw its FutureWarning on
    # every LoRA run and adapter load. Other warnings still reach them.
    _save_adapter(base, tmp_path / "lora", ["q_proj"])
    with pytest.warns() as caught:
        chatglm_sft.load_model(base, dtype=torch.float32, family="chatglm2-6b", adapter=tmp_path / "lora")
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert "a warning of our own" in messages
    assert not [m for m in messages if "is_gradient_checkpointing" in m], messages
