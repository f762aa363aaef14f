"""Several LoRA adapters in one server: `serve --adapter NAME=DIR` (repeatable).

All adapters live in one PEFT model over the shared base weights; each row of a batch names its adapter and PEFT
applies it to that row only (mixed-adapter batches, `adapter_names=`), so requests for different adapters and for
the base model decode together. docs/serving.md has the measurement against grouping rows by adapter.
"""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig, PeftModel, set_peft_model_state_dict

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family
from chatglm_sft.models.adapters import _adapter_state, _targets, load_adapter
from chatglm_sft.models.architectures import architecture_of

_NAME = re.compile(r"^[\w.:/-]{1,128}$")


def parse_adapter_options(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """`--adapter DIR` (one adapter applied to the served model, as in `predict`) or `--adapter NAME=DIR` (one
    model id per adapter). Returns (plain DIR or None, {NAME: DIR})."""
    plain = [v for v in values if "=" not in v]
    named: dict[str, str] = {}
    for value in values:
        if "=" not in value:
            continue
        name, folder = value.split("=", 1)
        if not _NAME.match(name):
            raise UserError(f"--adapter {value}: NAME must be 1-128 letters, digits or . _ - : /")
        if name in named:
            raise UserError(f"--adapter {value}: the name {name!r} is given twice")
        if not Path(folder).is_dir():
            raise UserError(f"--adapter {value}: {folder} is not a folder")
        named[name] = folder
    if plain and (named or len(plain) > 1):
        raise UserError("--adapter: give one DIR, or several NAME=DIR, not both")
    return (plain[0] if plain else None), named


def load_adapters(model, adapters: dict[str, str], family: Family) -> tuple[PeftModel, dict[str, str]]:
    """`model` with every LoRA adapter loaded; returns it and {served name: PEFT adapter name}."""
    keys: dict[str, str] = {}
    for i, (name, folder) in enumerate(adapters.items()):
        if i == 0:
            model = load_adapter(model, folder, family)  # the project's loader: both layouts, all checks
            if not isinstance(model, PeftModel):
                raise UserError(f"--adapter {name}={folder}: only LoRA adapters can be served side by side")
            keys[name] = model.active_adapter
        else:
            keys[name] = f"adapter{i}"
            _add_lora(model, Path(folder), keys[name], family)
    return model.eval(), keys


def _add_lora(model: PeftModel, folder: Path, key: str, family: Family) -> None:
    import json

    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: only LoRA adapters can be served side by side (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    arch = architecture_of(family)
    targets = _targets(config)
    thudm = arch.thudm_lora_targets and targets and all(t in arch.thudm_lora_targets for t in targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.base_model.model.named_modules()}
    if not thudm or set(targets) & names:
        try:
            model.load_adapter(str(folder), adapter_name=key, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{folder}: adapter does not fit this base model ({e})") from None
        return
    converted = arch.lora_from_thudm(_adapter_state(folder), model.base_model.model.config)
    lora_targets = sorted({t for name in targets for t in arch.thudm_lora_targets[name]})
    fields = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias")}
    model.add_adapter(key, LoraConfig(target_modules=lora_targets, **fields))
    result = set_peft_model_state_dict(model, converted, adapter_name=key)
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{key}." in k]
    if missing:
        raise UserError(f"{folder}: adapter tensors did not load (missing {missing[:3]})")
