"""Every tensor of an adapter must map to a module of the model: one that maps to nothing is named, even when the
tensor count still matches what the adapter creates."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import chatglm_sft
from chatglm_sft.errors import UserError


@pytest.fixture
def adapter(tmp_path, tiny_checkpoint):
    base = tiny_checkpoint("chatglm2-6b")
    model = chatglm_sft.load_model(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "lora"
    )
    return base, tmp_path / "lora"


def rename_tensor(folder, old: str, new: str) -> str:
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    name = next(k for k in state if old in k)
    state[name.replace(old, new)] = state.pop(name)
    save_file(state, str(path))
    return name.replace(old, new)


def test_the_adapter_loads_as_saved(adapter):
    base, lora = adapter
    chatglm_sft.load_model(base, dtype=torch.float32, adapter=lora)


def test_a_tensor_for_another_layer_is_named(adapter):
    base, lora = adapter
    stray = rename_tensor(lora, "layers.0.", "layers.40.")  # the same number of tensors, one matching nothing
    with pytest.raises(UserError, match=f"adapter tensor '{stray}' maps to no module"):
        chatglm_sft.load_model(base, dtype=torch.float32, adapter=lora)


def test_another_familys_module_names_are_named(adapter):
    base, lora = adapter
    stray = rename_tensor(lora, "self_attn.q_proj", "self_attention.query")
    with pytest.raises(UserError, match="maps to no module") as error:
        chatglm_sft.load_model(base, dtype=torch.float32, adapter=lora)
    assert stray in str(error.value)


def test_malformed_adapter_config_is_one_line(adapter):
    base, lora = adapter
    (lora / "adapter_config.json").write_text('{"r": 2,')
    with pytest.raises(UserError, match="adapter_config.json: not valid JSON"):
        chatglm_sft.load_model(base, dtype=torch.float32, adapter=lora)
