"""Tuning methods: which parameters train, and how the result is saved."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family
from chatglm_sft.train.config import TrainConfig


def prepare_model(model, config: TrainConfig, family: Family):
    """Make only the method's parameters trainable; LoRA wraps the model in PEFT."""
    if config.method in ("ptuning", "qlora"):
        raise UserError(f"--method {config.method} is not available yet; use lora, full or freeze")
    if config.method == "lora":
        targets = config.lora_targets or list(family.lora_targets)
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise UserError(f"--lora-targets: {unknown} are not modules of this {family.name} model")
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    layers = _decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(config.method == "full")
    if config.method == "freeze":
        if not 0 < config.freeze_trainable_layers <= len(layers):
            raise UserError(f"--freeze-trainable-layers must be between 1 and {len(layers)}")
        for layer in layers[-config.freeze_trainable_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model


def _decoder_layers(model) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "forward"):
            return module
    raise UserError("cannot find the decoder layers of this model")


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_result(model, output: Path, config: TrainConfig, source_model_dir: str, family: Family) -> None:
    """Write the adapter (LoRA) or the model (full, freeze) to `output`, then check it reads back."""
    if config.method == "lora":
        model.save_pretrained(output)
        check_adapter(model, output)
        return
    from chatglm_sft.tokenization.export import export_hf_tokenizer

    model.save_pretrained(output)
    if (Path(source_model_dir) / family.tokenizer_file).is_file():
        export_hf_tokenizer(family, Path(source_model_dir), output)


def check_adapter(model, folder: Path) -> None:
    """The saved adapter must read back as exactly the trained LoRA tensors (the seed project's loaded empty)."""
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    if not saved or set(saved) != set(expected):
        raise UserError(f"{folder}: saved adapter holds {len(saved)} tensors, expected {len(expected)}")
    for name, tensor in expected.items():
        if not torch.equal(saved[name], tensor.detach().cpu()):
            raise UserError(f"{folder}: saved adapter tensor {name} differs from the trained one")
    if not json.loads((folder / "adapter_config.json").read_text()).get("target_modules"):
        raise UserError(f"{folder}: adapter_config.json names no target modules")
