"""Models of the ChatGLM families with random weights: any ChatGLM2-architecture size for the demo and the benchmarks,
and complete tiny checkpoint folders of every family (THUDM's config, weights and a family-shaped tokenizer) that
load, detect and tokenize like a real download, for tests that must run without the published files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GlmConfig, GlmForCausalLM, PreTrainedModel

from chatglm_sft.families import Family, get_family
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.models.chatglm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM
from chatglm_sft.models.checkpoint import BIN_INDEX, save_sharded
from chatglm_sft.models.convert_glm import ROPE_BASE
from chatglm_sft.tokenization.synthetic import whole_character_ids, write_tokenizer


@dataclass(frozen=True)
class PublishedShape:
    """What a family's published config fixes regardless of the model's size."""

    vocab: int
    """`padded_vocab_size` (`vocab_size` for ChatGLM-6B)."""
    eps: float = 1e-5
    """`layernorm_epsilon`."""
    rope_ratio: float = 1.0
    """GLM-4 scales the rotary base by 500."""
    seq_length: int = 256
    """`seq_length`; ChatGLM3's published 8,192 is what tells it from ChatGLM2 when no tokenizer config is at hand."""
    weights: str = "safetensors"
    """How THUDM publishes the weights: ``safetensors`` shards, or ``bin`` shards (ChatGLM-6B)."""


PUBLISHED: dict[str, PublishedShape] = {
    "chatglm-6b": PublishedShape(vocab=130528, weights="bin"),
    "chatglm2-6b": PublishedShape(vocab=65024),
    "chatglm3-6b": PublishedShape(vocab=65024, seq_length=8192),
    "glm-4": PublishedShape(vocab=151552, eps=1.5625e-7, rope_ratio=500, seq_length=131072),
}


def glm_config(
    hidden: int,
    layers: int,
    ffn: int,
    head_dim: int = 128,
    kv_groups: int = 2,
    heads: int | None = None,
    max_positions: int | None = None,
    family: str = "chatglm2-6b",
) -> GlmConfig:
    """ChatGLM2/3 or GLM-4's architecture (grouped kv heads, q/k/v bias, RoPE on half of each head) at any size."""
    fam, published = get_family(family), PUBLISHED[get_family(family).name]
    return GlmConfig(
        vocab_size=published.vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads or hidden // head_dim,
        num_key_value_heads=kv_groups,
        head_dim=head_dim,
        max_position_embeddings=max_positions or published.seq_length,
        rms_norm_eps=published.eps,
        attention_bias=True,
        pad_token_id=fam.pad_id,
        eos_token_id=fam.stop_ids,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_BASE * published.rope_ratio,
            "partial_rotary_factor": 0.5,
        },
    )


def chatglm2_config(
    hidden: int,
    layers: int,
    ffn: int,
    head_dim: int = 128,
    kv_groups: int = 2,
    heads: int | None = None,
    max_positions: int = 2048,
) -> GlmConfig:
    """ChatGLM2's architecture (65,024 vocabulary)."""
    return glm_config(hidden, layers, ffn, head_dim, kv_groups, heads, max_positions, family="chatglm2-6b")


def chatglm_v1_config(hidden: int, layers: int, heads: int, ffn: int, max_positions: int = 256) -> ChatGLMv1Config:
    """ChatGLM-6B's architecture (130,528 vocabulary, 2D positions, prefix-LM mask) at any size."""
    return ChatGLMv1Config(
        vocab_size=PUBLISHED["chatglm-6b"].vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        inner_hidden_size=ffn,
        max_sequence_length=max_positions,
    )


def random_model(config, seed: int = 0) -> PreTrainedModel:
    """A model of `config` (a `GlmConfig` or a `ChatGLMv1Config`) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model_class = ChatGLMv1ForCausalLM if isinstance(config, ChatGLMv1Config) else GlmForCausalLM
    return model_class(config).eval()


def write_thudm_checkpoint(
    model: PreTrainedModel, folder: Path, family: str = "chatglm2-6b", shards: int = 1, fmt: str = "safetensors"
) -> Path:
    """`model` in THUDM's layout (in the model's dtype), so loading goes through the converter like a real download;
    `shards` > 1 splits the weights into about that many files with an index, as THUDM publishes them."""
    fam = get_family(family)
    arch = architecture_of(fam)
    config = model.config
    config.dtype = next(model.parameters()).dtype
    state = arch.state_to_thudm(model.state_dict(), config)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        _save_bin_shards(state, folder, shards)
    else:
        total = sum(t.numel() * t.element_size() for t in state.values())
        save_sharded(state, folder, max_shard_bytes=total // shards + 1 if shards > 1 else total + 1)
    (folder / "config.json").write_text(json.dumps(arch.config_to_thudm(config, fam), indent=2) + "\n")
    return folder


def _save_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """`pytorch_model-0000k-of-0000n.bin` files and their index, as THUDM published ChatGLM-6B."""
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n].contiguous() for n in names[k * per : (k + 1) * per]}
        torch.save(part, folder / file)
        weight_map |= dict.fromkeys(part, file)
    (folder / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def _scale_like_trained(model: PreTrainedModel) -> None:
    """Linear weights with a standard deviation of 1/sqrt(fan-in) instead of the 0.02 meant for 4,096-wide models:
    at a width of 32-64 that leaves attention and MLPs too weak to matter next to the residual stream (ChatGLM-6B's
    DeepNorm scales it by 7.5), and training a prefix or a LoRA adapter would barely change anything."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
                module.weight.normal_(std=module.weight.shape[1] ** -0.5)


def _favour_vocabulary(model: PreTrainedModel, in_use: list[int], logit_scale: float = 4.0) -> None:
    """Make the random model speak the tokenizer's language: the output rows of ids outside `in_use` (padding pieces,
    lone bytes of multi-byte characters) become zero, and the others are scaled so their logits spread with a
    standard deviation of about `logit_scale`; greedy tokens then decode to text, and sampled ones mostly do."""
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        keep = torch.zeros(weight.shape[0], dtype=torch.bool)
        keep[in_use] = True
        weight[~keep] = 0
        weight[keep] *= logit_scale / (weight[keep].std() * weight.shape[1] ** 0.5)


TINY_SHAPES: dict[str, dict] = {
    "chatglm-6b": {"hidden": 32, "layers": 2, "heads": 4, "ffn": 128},
    "chatglm2-6b": {"hidden": 64, "layers": 2, "heads": 4, "head_dim": 16, "kv_groups": 2, "ffn": 96},
    "chatglm3-6b": {"hidden": 64, "layers": 2, "heads": 4, "head_dim": 16, "kv_groups": 2, "ffn": 96},
    "glm-4": {"hidden": 32, "layers": 2, "heads": 4, "head_dim": 8, "kv_groups": 2, "ffn": 64},
}
"""The shapes of the tiny reference checkpoints THUDM's code was run on (see ../shared/reference/tiny)."""


def _tiny_config(fam: Family, shape: dict):
    if fam.architecture == "chatglm-v1":
        return chatglm_v1_config(**shape)
    return glm_config(family=fam.name, **shape)


def write_tiny_checkpoint(
    folder: str | Path,
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    texts: list[str] | None = None,
    tokenizer_options: dict | None = None,
    **shape,
) -> Path:
    """A complete THUDM-layout folder of `family` (config.json, sharded weights, the family's tokenizer file and
    tokenizer_config.json) with random weights, in a tiny shape; `shape` overrides `TINY_SHAPES[family]` (e.g.
    ``kv_groups=1``, ``layers=3``). `texts` trains the tokenizer (default: generated Chinese/English text);
    `tokenizer_options` go to its writer (`chatglm_sft.tokenization.synthetic.WRITERS`)."""
    fam = get_family(family)
    folder = Path(folder)
    tokenizer_file = write_tokenizer(folder, fam, texts, **(tokenizer_options or {}))
    model = random_model(_tiny_config(fam, TINY_SHAPES[fam.name] | shape), seed)
    _scale_like_trained(model)
    _favour_vocabulary(model, whole_character_ids(fam, tokenizer_file))
    write_thudm_checkpoint(model.to(dtype), folder, fam.name, shards=2, fmt=PUBLISHED[fam.name].weights)
    return folder
