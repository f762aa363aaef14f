"""THUDM's ChatGLM2/3 and GLM-4 layout <-> transformers' native `GlmForCausalLM`.

The two compute the same function; only names and two fused matrices differ:

* ``self_attention.query_key_value`` holds rows ``[Q (heads*d) | K (groups*d) | V (groups*d)]`` -> q/k/v_proj;
* ``mlp.dense_h_to_4h`` holds ``[gate | up]``, exactly `GlmMLP.gate_up_proj`'s order, so it is only renamed;
* ``rope_ratio`` scales the RoPE base (theta = 10000 * rope_ratio); RoPE covers half of each head (partial 0.5).

Both directions are strict: a tensor name the converter does not know is an error that names it.
"""

from __future__ import annotations

import re

import torch
from transformers import GlmConfig

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family

ROPE_BASE = 10000.0

# THUDM name (after "transformer.encoder.layers.N.") -> HF name (after "model.layers.N.")
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_IGNORED = {"transformer.rotary_pos_emb.inv_freq"}  # recomputed from the config, as the reference does
_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _require(config: dict, key: str, expected, path: str) -> None:
    if config.get(key, expected) != expected:
        raise UserError(f"{path}: {key}={config[key]!r} is not supported (ChatGLM2/3 and GLM-4 use {expected!r})")


def hf_config_from_thudm(config: dict, family: Family, path: str = "config.json") -> GlmConfig:
    """The `GlmConfig` that computes what THUDM's `ChatGLMModel` with `config` computes."""
    for key, expected in [
        ("add_bias_linear", False),
        ("rmsnorm", True),
        ("post_layer_norm", True),
        ("apply_residual_connection_post_layernorm", False),
        ("original_rope", True),
    ]:
        _require(config, key, expected, path)
    heads = config["num_attention_heads"]
    kv_heads = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    return GlmConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=config.get("kv_channels", config["hidden_size"] // heads),
        max_position_embeddings=config.get("seq_length", 8192),
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        attention_bias=config.get("add_qkv_bias", True),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_BASE * config.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=family.pad_id,
        eos_token_id=family.stop_ids,
        tie_word_embeddings=False,
    )


def thudm_config_from_hf(config: GlmConfig, family: Family) -> dict:
    """THUDM's `config.json` for a GLM model (the fields THUDM's `ChatGLMConfig` reads)."""
    rope_ratio = config.rope_parameters["rope_theta"] / ROPE_BASE
    out = {
        "_name_or_path": f"THUDM/{family.name}",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": config.attention_bias,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": config.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": config.hidden_size,
        "kv_channels": config.head_dim,
        "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": config.num_key_value_heads != config.num_attention_heads,
        "multi_query_group_num": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": config.max_position_embeddings,
        "use_cache": True,
        "tie_word_embeddings": False,
        "eos_token_id": family.eos_id if len(family.stop_ids) == 1 else family.stop_ids,
        "pad_token_id": family.pad_id,
        "torch_dtype": str(config.dtype).removeprefix("torch.") if config.dtype else "float16",
    }
    if rope_ratio != 1:
        out["rope_ratio"] = rope_ratio if rope_ratio != int(rope_ratio) else int(rope_ratio)
    return out


def _split_qkv(tensor: torch.Tensor, config: GlmConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    if tensor.shape[0] != q + 2 * kv:
        raise UserError(f"query_key_value has {tensor.shape[0]} rows, config implies {q + 2 * kv}")
    # clone: the projections must not share (and keep alive) the fused matrix's storage
    return tensor[:q].clone(), tensor[q : q + kv].clone(), tensor[q + kv :].clone()


def thudm_to_hf(name: str, tensor: torch.Tensor, config: GlmConfig) -> list[tuple[str, torch.Tensor]]:
    """Convert one THUDM tensor to its HF-native name(s); unknown names raise `UserError`."""
    if name in _IGNORED:
        return []
    if name in _TOP_RENAMES:
        return [(_TOP_RENAMES[name], tensor)]
    match = _LAYER.fullmatch(name)
    if match:
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], tensor)]
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = _split_qkv(tensor, config)
            return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    raise UserError(f"unexpected tensor {name!r} in checkpoint")


def hf_to_thudm(state: dict[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """The inverse of `thudm_to_hf` over a whole state dict, including the `inv_freq` THUDM stores."""
    top = {hf: th for th, hf in _TOP_RENAMES.items()}
    layer_names = {hf: th for th, hf in _LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    dtype = state["model.embed_tokens.weight"].dtype
    out["transformer.embedding.word_embeddings.weight"] = state["model.embed_tokens.weight"]
    rot = config.head_dim // 2
    out["transformer.rotary_pos_emb.inv_freq"] = (
        1.0 / (ROPE_BASE ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    ).to(dtype)
    for i in range(config.num_hidden_layers):
        hf, th = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        out[th + "input_layernorm.weight"] = state[hf + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            if hf + f"self_attn.q_proj.{kind}" in state:
                parts = [state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[th + f"self_attention.query_key_value.{kind}"] = torch.cat(parts, dim=0)
        for hf_rest, th_rest in layer_names.items():
            if hf_rest != "input_layernorm.weight":
                out[th + th_rest] = state[hf + hf_rest]
    out["transformer.encoder.final_layernorm.weight"] = state["model.norm.weight"]
    out["transformer.output_layer.weight"] = state["lm_head.weight"]
    known = set(top) | {"model.embed_tokens.weight"}
    for name in state:
        m = _HF_LAYER.fullmatch(name)
        if name not in known and not (m and int(m.group(1)) < config.num_hidden_layers):
            raise UserError(f"unexpected tensor {name!r} for the THUDM layout")
    return out


def thudm_name(hf_name: str) -> str:
    """THUDM's name for the tensor that provides `hf_name` (for error messages about missing tensors)."""
    top = {hf: th for th, hf in _TOP_RENAMES.items()}
    if hf_name in top:
        return top[hf_name]
    match = _HF_LAYER.fullmatch(hf_name)
    if not match:
        return hf_name
    layer, rest = match.groups()
    by_hf = {hf: th for th, hf in _LAYER_RENAMES.items()}
    if rest in by_hf:
        return f"transformer.encoder.layers.{layer}.{by_hf[rest]}"
    kind = rest.rsplit(".", 1)[1]
    return f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}"


# LoRA adapters saved against THUDM's module names (the seed project, ChatGLM-Tuning, LLaMA-Factory for ChatGLM2/3).
THUDM_LORA_TARGETS = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("gate_up_proj",),
    "dense_4h_to_h": ("down_proj",),
}
_LORA_KEY = re.compile(
    r"(?:base_model\.model\.)?transformer\.encoder\.layers\.(\d+)\.(self_attention|mlp)\.(\w+)\.(lora_[AB])\.weight"
)


def lora_state_from_thudm(state: dict[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors on THUDM's modules -> the same low-rank update on `GlmForCausalLM`'s modules.

    For the fused ``query_key_value``, W + B·A splits exactly: q/k/v each keep A and take their rows of B.
    """
    out = {}
    for name, tensor in state.items():
        match = _LORA_KEY.fullmatch(name)
        if not match or match.group(3) not in THUDM_LORA_TARGETS:
            raise UserError(f"unexpected tensor {name!r} in a THUDM-layout LoRA adapter")
        layer, block, module, lora = match.groups()
        parent = "self_attn" if block == "self_attention" else "mlp"
        targets = THUDM_LORA_TARGETS[module]
        if module == "query_key_value" and lora == "lora_B":
            parts = _split_qkv(tensor, config)
        else:
            parts = [tensor] * len(targets)
        for target, part in zip(targets, parts, strict=True):
            out[f"base_model.model.model.layers.{layer}.{parent}.{target}.{lora}.weight"] = part
    return out
