"""PEFT adapters load onto chatglm-sft models and change their outputs; mismatches are clear errors."""

from __future__ import annotations

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
        export_model(base, tmp_path / "merged", adapter=tmp_path / "lora", family="chatglm2-6b", dtype="float32")
        merged = chatglm_sft.load_model(tmp_path / "merged", dtype=torch.float32)
        assert (merged(ids).logits - adapted(ids).logits).abs().max() <= 1e-4


def test_adapter_for_other_modules_is_a_clear_error(base, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["c_attn"]}')
    with pytest.raises(UserError, match="c_attn"):
        chatglm_sft.load_model(base, family="chatglm2-6b", adapter=tmp_path / "bad")
    with pytest.raises(UserError, match="not a PEFT adapter"):
        chatglm_sft.load_model(base, family="chatglm2-6b", adapter=tmp_path)
