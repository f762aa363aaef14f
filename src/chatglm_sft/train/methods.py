"""Tuning methods: which parameters train, and how the result is saved."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family
from chatglm_sft.models.adapters import peft_wrapping
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.train.config import TrainConfig


def check_qlora_support(device: torch.device) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; say so before anything is loaded."""
    missing = []
    if device.type != "cuda" or not torch.cuda.is_available():
        missing.append("a CUDA GPU (this run is on the CPU)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install bitsandbytes)")
    if missing:
        raise UserError(
            "--method qlora loads the base model in 4-bit NF4 with bitsandbytes and needs "
            + " and ".join(missing)
            + "; use --method lora on this machine"
        )


def quantize_nf4(model):
    """Replace the decoder's linear layers (not the output layer) with bitsandbytes 4-bit NF4 layers."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    output = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not output:
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                )
                layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, layer.to(child.weight.device))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def prepare_model(model, config: TrainConfig, family: Family):
    """Make only the method's parameters trainable (see `METHODS`)."""
    return METHODS[config.method].prepare(model, config, family)


def _prepare_prefix(model, config: TrainConfig, family: Family):
    """P-Tuning v2: a frozen base with the architecture's trainable prefix encoder (in float32)."""
    for p in model.parameters():
        p.requires_grad_(False)
    arch = architecture_of(family)
    model = arch.add_prefix(model, config.pre_seq_len, config.prefix_projection)
    encoder = model.get_submodule(arch.prefix_module)
    encoder.float()  # the prefix trains in float32 even over a half-precision base
    for p in encoder.parameters():
        p.requires_grad_(True)
    return model


def _prepare_lora(model, config: TrainConfig, family: Family):
    """PEFT LoRA on the family's target modules; with `--ref-adapter` the given adapter is continued."""
    if getattr(config, "ref_adapter", None):
        from peft import PeftModel

        with peft_wrapping():
            return PeftModel.from_pretrained(model, config.ref_adapter, is_trainable=True)
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
    with peft_wrapping():
        return get_peft_model(model, lora)


def _prepare_qlora(model, config: TrainConfig, family: Family):
    """LoRA over the base quantized to 4-bit NF4."""
    return _prepare_lora(quantize_nf4(model), config, family)


def _prepare_full(model, config: TrainConfig, family: Family):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _prepare_freeze(model, config: TrainConfig, family: Family):
    """Only the last `--freeze-trainable-layers` decoder layers train."""
    layers = decoder_layers(model)
    if not 0 < config.freeze_trainable_layers <= len(layers):
        raise UserError(f"--freeze-trainable-layers must be between 1 and {len(layers)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[-config.freeze_trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "forward"):
            return module
    raise UserError("cannot find the decoder layers of this model")


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_result(model, output: Path, config: TrainConfig, source_model_dir: str, family: Family, state: dict) -> None:
    """Write the method's result to `output` from `state` (whole tensors gathered from all processes, see
    parallel.py), then check it reads back."""
    METHODS[config.method].save(model, output, source_model_dir, family, state)


def _save_model(model, output: Path, source_model_dir: str, family: Family, state: dict) -> None:
    """A whole model (full, freeze) with the family's tokenizer exported beside it."""
    from chatglm_sft.tokenization.export import export_hf_tokenizer

    model.save_pretrained(output, state_dict=state)
    if (Path(source_model_dir) / family.tokenizer_file).is_file():
        export_hf_tokenizer(family, Path(source_model_dir), output)


def _save_adapter(model, output: Path, source_model_dir: str, family: Family, state: dict) -> None:
    save_adapter(model, output, state)


def trainable_only(method: str) -> bool:
    """Whether the result of `method` is its trained tensors alone (adapters, prefixes) rather than a whole model."""
    return METHODS[method].result != "model"


def save_adapter(model, folder: Path, state: dict) -> None:
    """PEFT's adapter files, checked to read back as exactly the trained LoRA tensors (the seed project's loaded
    empty)."""
    model.save_pretrained(folder, state_dict=state)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model, state_dict=state)
    if not saved or set(saved) != set(expected):
        raise UserError(f"{folder}: saved adapter holds {len(saved)} tensors, expected {len(expected)}")
    for name, tensor in expected.items():
        if not torch.equal(saved[name], tensor.detach().cpu()):
            raise UserError(f"{folder}: saved adapter tensor {name} differs from the trained one")
    if not json.loads((folder / "adapter_config.json").read_text()).get("target_modules"):
        raise UserError(f"{folder}: adapter_config.json names no target modules")


def save_prefix(model, output: Path, source_model_dir: str, family: Family, state: dict) -> None:
    """P-Tuning v2 output in THUDM's layout: the base `config.json` plus `pre_seq_len`/`prefix_projection`, and a
    `pytorch_model.bin` holding only `transformer.prefix_encoder.*` (what THUDM's demos load)."""
    prefix = architecture_of(family).prefix_module + "."
    state = {
        "transformer.prefix_encoder." + k.removeprefix(prefix): v.contiguous()
        for k, v in state.items()
        if k.startswith(prefix)
    }
    if not state:
        raise UserError(f"{output}: the model has no trained prefix encoder to save")
    torch.save(state, output / "pytorch_model.bin")
    config = json.loads((Path(source_model_dir) / "config.json").read_text())
    config.update(
        {
            "pre_seq_len": model.config.pre_seq_len,
            "prefix_projection": model.config.prefix_projection,
            "chatglm_sft_family": family.name,
        }
    )
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    reread = torch.load(output / "pytorch_model.bin", weights_only=True)
    if set(reread) != set(state) or not all(torch.equal(reread[k], state[k]) for k in state):
        raise UserError(f"{output}: the saved prefix encoder does not read back as trained")


def _no_requirement(device: torch.device) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """A tuning method as data: what trains, over which base, where it may run and what it leaves behind."""

    name: str
    prepare: Callable
    """(model, config, family) -> the model with only this method's parameters trainable (LoRA wraps it in PEFT)."""
    base_dtype: Callable[[TrainConfig], str]
    """The dtype the base weights are loaded in (frozen bases may be half precision; trained weights stay float32)."""
    result: str
    """What `save` writes: `adapter` (PEFT files), `prefix` (THUDM's P-Tuning layout) or `model` (a whole model)."""
    save: Callable
    """(model, output, source_model_dir, family, state) -> None; checks the result reads back."""
    strategies: tuple[str, ...] = ("single", "ddp", "fsdp", "deepspeed")
    """Multi-process strategies it runs under."""
    check_device: Callable[[torch.device], None] = _no_requirement
    """Refuses (UserError) a device the method cannot run on, before anything is loaded."""

    @property
    def adapter(self) -> bool:
        """Whether the result is a PEFT adapter (and a checkpoint carries a usable copy of it)."""
        return self.result == "adapter"


def _frozen_base_dtype(config: TrainConfig) -> str:
    return config.dtype or "float32"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", _prepare_lora, _frozen_base_dtype, "adapter", _save_adapter),
        Method("full", _prepare_full, lambda c: "float32", "model", _save_model),
        Method("freeze", _prepare_freeze, lambda c: "float32", "model", _save_model),
        Method("ptuning", _prepare_prefix, _frozen_base_dtype, "prefix", save_prefix),
        Method(
            "qlora",
            _prepare_qlora,
            lambda c: "bfloat16",
            "adapter",
            _save_adapter,
            strategies=("single", "ddp"),
            check_device=check_qlora_support,
        ),
    )
}
"""Every `--method`; `chatglm_sft.train.config.METHODS` names the same keys."""
