"""Loading PEFT adapters on top of a loaded base model, with clear errors for mismatches."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, family: Family):
    """Wrap `model` in a `peft.PeftModel` with the adapter in `adapter_dir` (PEFT format)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(
            f"{config_path}: target modules {unknown} do not exist in this {family.name} model "
            f"(wrong base model or family?)"
        )
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatches and broken files
        raise UserError(f"{adapter_dir}: adapter does not fit this base model ({e})") from None
