"""ChatGLM2-architecture models of any size with random weights, for the demo and the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GlmConfig, GlmForCausalLM

from chatglm_sft.families import get_family
from chatglm_sft.models.checkpoint import save_sharded
from chatglm_sft.models.convert_glm import hf_to_thudm, thudm_config_from_hf


def chatglm2_config(
    hidden: int,
    layers: int,
    ffn: int,
    head_dim: int = 128,
    kv_groups: int = 2,
    heads: int | None = None,
    max_positions: int = 2048,
) -> GlmConfig:
    """ChatGLM2's architecture (65,024 vocabulary, grouped kv heads, q/k/v bias, RoPE on half of each head)."""
    family = get_family("chatglm2-6b")
    return GlmConfig(
        vocab_size=65024,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads or hidden // head_dim,
        num_key_value_heads=kv_groups,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        attention_bias=True,
        pad_token_id=family.pad_id,
        eos_token_id=family.stop_ids,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )


def random_model(config: GlmConfig, seed: int = 0) -> GlmForCausalLM:
    torch.manual_seed(seed)
    return GlmForCausalLM(config).eval()


def write_thudm_checkpoint(model: GlmForCausalLM, folder: Path) -> Path:
    """`model` in THUDM's ChatGLM2 layout (float32), so loading goes through the converter like a real download."""
    config = model.config
    config.dtype = torch.float32
    save_sharded(hf_to_thudm(model.state_dict(), config), folder)
    (folder / "config.json").write_text(json.dumps(thudm_config_from_hf(config, get_family("chatglm2-6b")), indent=2))
    return folder
