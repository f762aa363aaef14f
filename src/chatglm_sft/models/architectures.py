"""How each model architecture is built, converted from THUDM's layout and converted back.

`Family.architecture` names one of these records; loading and export read them instead of branching on families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GlmConfig, GlmForCausalLM, PretrainedConfig, PreTrainedModel

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family
from chatglm_sft.models import convert_glm
from chatglm_sft.models.chatglm_v1 import (
    ChatGLMv1Config,
    ChatGLMv1ForCausalLM,
    next_position_ids,
    position_ids_from_ids,
    prefix_lm_mask,
    rotary_inv_freq,
)
from chatglm_sft.models.prefix import GlmPrefixForCausalLM

TensorPairs = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Architecture:
    """Build, convert and export one model architecture."""

    model_class: type[PreTrainedModel]
    """The `PreTrainedModel` subclass that runs it."""
    native_model_type: str
    """`model_type` of an HF-native folder of this architecture (loaded without conversion)."""
    config_from_thudm: Callable[[dict, Family, str], PretrainedConfig]
    """THUDM `config.json` dict -> our config."""
    config_to_thudm: Callable[[PretrainedConfig, Family], dict]
    """Our config -> THUDM `config.json` dict."""
    tensor_from_thudm: Callable[[str, torch.Tensor, PretrainedConfig], TensorPairs]
    """One THUDM tensor -> our tensor(s); unknown names raise `UserError`."""
    state_to_thudm: Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]]
    """Our whole state dict -> THUDM's."""
    thudm_name: Callable[[str], str]
    """Our tensor name -> the THUDM tensor it comes from."""
    first_positions: Callable[[PretrainedConfig, torch.Tensor, torch.Tensor], torch.Tensor]
    """Position ids of a left-padded prompt batch (ids, attention mask)."""
    next_positions: Callable[[torch.Tensor], torch.Tensor]
    """Position ids of the next token from the last ones (`positions[..., -1:]`)."""
    reuses_prefix_cache: bool
    """Whether a KV cache stays valid when the prompt grows (False under a prefix-LM mask, which sees ahead)."""
    example_attention: Callable[[PretrainedConfig, torch.Tensor], torch.Tensor] | None = None
    """[L, L] boolean mask (True: may attend) of one example [1, L], for packing several into a row."""
    mask_for_model: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A [B, 1, L, L] boolean mask (True: may attend) in the form the model takes as a 4-D attention mask."""
    add_prefix: Callable[[PreTrainedModel, int, bool], PreTrainedModel] | None = None
    """Give a loaded model a fresh P-Tuning v2 prefix encoder (pre_seq_len, prefix_projection)."""
    prefix_module: str = "prefix_encoder"
    """Where the prefix encoder lives (THUDM's checkpoints name it `transformer.prefix_encoder`)."""
    lora_from_thudm: Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]] | None = None
    """Converts a LoRA adapter saved on THUDM's module names, when ours differ (None: the names are THUDM's)."""
    thudm_lora_targets: dict[str, tuple[str, ...]] | None = None
    """THUDM module name -> our module names, for those adapters."""

    def native_config(self, raw: dict) -> PretrainedConfig:
        return self.model_class.config_class.from_dict(raw)


# --- ChatGLM-6B keeps THUDM's names: conversion only drops the recomputed rotary frequencies.

_V1_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "inner_hidden_size",
    "layernorm_epsilon",
    "max_sequence_length",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "mask_token_id",
    "gmask_token_id",
)


def _v1_config_from_thudm(raw: dict, family: Family, path: str) -> ChatGLMv1Config:
    if raw.get("position_encoding_2d") is False:
        raise UserError(f"{path}: position_encoding_2d=false is not supported (ChatGLM-6B uses 2D positions)")
    if raw.get("quantization_bit"):
        raise UserError(f"{path}: THUDM's pre-quantized checkpoints are not supported; load the fp16 weights")
    return ChatGLMv1Config(**{k: raw[k] for k in _V1_KEYS if k in raw})


def _v1_config_to_thudm(config: ChatGLMv1Config, family: Family) -> dict:
    out = {"_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"], "model_type": "chatglm"}
    out.update({k: getattr(config, k) for k in _V1_KEYS})
    out.update(
        {
            "position_encoding_2d": True,
            "use_cache": True,
            "torch_dtype": str(config.dtype).removeprefix("torch.") if config.dtype else "float16",
        }
    )
    return out


def _v1_tensor_from_thudm(name: str, tensor: torch.Tensor, config) -> TensorPairs:
    return [] if name.endswith("rotary_emb.inv_freq") else [(name, tensor)]


def _v1_state_to_thudm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """THUDM's checkpoints also store each layer's (fp16-rounded) rotary frequencies; write them back."""
    out = {}
    inv_freq = rotary_inv_freq(config.hidden_size // config.num_attention_heads)
    for name, tensor in state.items():
        out[name] = tensor
        if name.endswith(".input_layernorm.bias"):
            out[name.replace("input_layernorm.bias", "attention.rotary_emb.inv_freq")] = inv_freq.to(tensor.dtype)
    return out


def _v1_add_prefix(model: ChatGLMv1ForCausalLM, pre_seq_len: int, projection: bool) -> ChatGLMv1ForCausalLM:
    model.transformer.enable_prefix(pre_seq_len, projection)
    return model


ARCHITECTURES: dict[str, Architecture] = {
    "glm": Architecture(
        model_class=GlmForCausalLM,
        native_model_type=GlmConfig.model_type,
        config_from_thudm=convert_glm.hf_config_from_thudm,
        config_to_thudm=convert_glm.thudm_config_from_hf,
        tensor_from_thudm=convert_glm.thudm_to_hf,
        state_to_thudm=convert_glm.hf_to_thudm,
        thudm_name=convert_glm.thudm_name,
        first_positions=lambda config, ids, mask: (mask.long().cumsum(-1) - 1).clamp(min=0),
        next_positions=lambda last: last + 1,
        reuses_prefix_cache=True,
        example_attention=lambda config, ids: torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(),
        mask_for_model=lambda allowed: allowed,
        add_prefix=GlmPrefixForCausalLM.from_base,
        prefix_module="prefix_encoder",
        lora_from_thudm=convert_glm.lora_state_from_thudm,
        thudm_lora_targets=convert_glm.THUDM_LORA_TARGETS,
    ),
    "chatglm-v1": Architecture(
        model_class=ChatGLMv1ForCausalLM,
        native_model_type=ChatGLMv1Config.model_type,
        config_from_thudm=_v1_config_from_thudm,
        config_to_thudm=_v1_config_to_thudm,
        tensor_from_thudm=_v1_tensor_from_thudm,
        state_to_thudm=_v1_state_to_thudm,
        thudm_name=lambda name: name,
        first_positions=lambda config, ids, mask: position_ids_from_ids(ids, config, mask),
        next_positions=next_position_ids,
        reuses_prefix_cache=False,
        example_attention=lambda config, ids: prefix_lm_mask(ids, config, None, 0)[0, 0],
        mask_for_model=lambda allowed: ~allowed,  # ChatGLM-6B takes THUDM's convention: True = masked
        add_prefix=_v1_add_prefix,
        prefix_module="transformer.prefix_encoder",
    ),
}


def architecture_of(family: Family) -> Architecture:
    return ARCHITECTURES[family.architecture]
