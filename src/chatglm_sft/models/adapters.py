"""Loading PEFT adapters on top of a loaded base model, with clear errors for mismatches.

Two kinds load: our own (PEFT format, the model's module names) and LoRA adapters saved against THUDM's module
names (``query_key_value`` ...), which are converted exactly onto the native modules. An adapter whose tensors do
not all land in the model is an error, never a silently unloaded adapter.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family, read_json
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.models.checkpoint import iter_shards


@contextmanager
def peft_wrapping():
    """Inside, PEFT wraps a model without transformers' FutureWarning about `is_gradient_checkpointing`: PEFT reads
    that deprecated alias itself on every wrap, so every LoRA run and adapter load printed it, and nothing a user
    changes silences it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _adapter_state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    safe, binary = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    try:
        if safe.is_file():
            return load_file(str(safe))
        if binary.is_file():
            return torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged files raise many types
        raise UserError(f"{adapter_dir}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    raise UserError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def _check_loaded(model, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Every tensor of the adapter file must be a parameter of the model: PEFT only warns about names that match
    nothing (another family's module paths, other layers), and the adapter would silently not apply."""
    adapter_name = getattr(model, "active_adapter", "default")
    # PEFT saves parameter names without the adapter's name ("lora_A.default.weight" -> "lora_A.weight").
    params = {
        name.replace(f".{adapter_name}.", ".").removesuffix(f".{adapter_name}") for name, _ in model.named_parameters()
    }
    if not state:
        raise UserError(f"{adapter_dir}: the adapter has no tensors")
    for name in state:
        if name not in params:
            raise UserError(
                f"{adapter_dir}: adapter tensor {name!r} maps to no module of this model (wrong base model, family "
                "or target modules?)"
            )


def _load_thudm_lora(model: PreTrainedModel, adapter_dir: Path, config: dict, family: Family):
    arch = architecture_of(family)
    state = _adapter_state(adapter_dir)
    converted = arch.lora_from_thudm(state, model.config)
    targets = sorted({t for name in _targets(config) for t in arch.thudm_lora_targets[name]})
    fields = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias")}
    with peft_wrapping():
        peft_model = get_peft_model(model, LoraConfig(target_modules=targets, **fields))
    try:
        result = set_peft_model_state_dict(peft_model, converted)
    except RuntimeError as e:
        raise UserError(f"{adapter_dir}: adapter does not fit this base model ({e})") from None
    _check_loaded(peft_model, converted, adapter_dir)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:
        raise UserError(f"{adapter_dir}: the adapter has no tensor for {missing[0]!r} (of {len(missing)} missing)")
    return peft_model.eval()


def _prefix_state(folder: Path) -> dict[str, torch.Tensor]:
    """The prefix encoder's tensors in `folder`'s weight files: a prefix-only file (what training writes), or a
    whole model in THUDM's P-Tuning layout."""
    state = {}
    for shard in iter_shards(folder):
        state.update({name: tensor for name, tensor in shard.items() if "prefix_encoder." in name})
    if not state:
        raise UserError(f"{folder}: no prefix encoder tensors (transformer.prefix_encoder.*) in its weights")
    return state


def load_prefix(model: PreTrainedModel, folder: Path, family: Family) -> PreTrainedModel:
    """A P-Tuning v2 folder (THUDM's layout: base config.json plus `pre_seq_len`, prefix weights only)."""
    config = read_json(folder / "config.json")
    state = _prefix_state(folder)
    prefix = {}
    for name, tensor in state.items():
        prefix[name.split("prefix_encoder.", 1)[1]] = tensor
    arch = architecture_of(family)
    model = arch.add_prefix(model, int(config["pre_seq_len"]), bool(config.get("prefix_projection")))
    encoder = model.get_submodule(arch.prefix_module)
    dtype = next(model.parameters()).dtype
    try:
        encoder.load_state_dict({k: v.to(dtype) for k, v in prefix.items()})
    except RuntimeError as e:
        raise UserError(f"{folder}: prefix encoder does not fit this base model ({e})") from None
    return model.eval()


def is_prefix(adapter_dir: str | Path) -> bool:
    """Whether `adapter_dir` holds a P-Tuning v2 prefix (THUDM's layout) rather than a PEFT adapter."""
    folder = Path(adapter_dir)
    config = folder / "config.json"
    return (
        not (folder / "adapter_config.json").is_file()
        and config.is_file()
        and bool(read_json(config).get("pre_seq_len"))
    )


def merge_lora(model):
    """The model with a LoRA adapter merged into its weights; a P-Tuning prefix cannot be merged and stays its own
    module (in floating point)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, family: Family):
    """Wrap `model` in a `peft.PeftModel` with the adapter in `adapter_dir`, or add a P-Tuning prefix."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if is_prefix(adapter_dir):
        return load_prefix(model, adapter_dir, family)
    if not config_path.is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    config = read_json(config_path)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = _targets(config)
    arch = architecture_of(family)
    if (
        arch.lora_from_thudm
        and targets
        and all(t in arch.thudm_lora_targets for t in targets)
        and not (set(targets) & names)
    ):
        return _load_thudm_lora(model, adapter_dir, config, family)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(
            f"{config_path}: target modules {unknown} do not exist in this {family.name} model "
            "(wrong base model or family?)"
        )
    try:
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatches and broken files
        raise UserError(f"{adapter_dir}: adapter does not fit this base model ({e})") from None
    _check_loaded(peft_model, _adapter_state(adapter_dir), adapter_dir)
    return peft_model
