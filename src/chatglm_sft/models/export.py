"""`chatglm-sft export`: write a model folder as HF-native (default) or in THUDM's layout.

HF: `GlmForCausalLM` safetensors shards, a generation config with the family's stop ids, and a standalone
tokenizer (ChatGLM-6B: our own model class and THUDM's tokenizer files). THUDM: their parameter names and
`config.json`, bit-exact with the checkpoint it came from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from chatglm_sft.errors import UserError
from chatglm_sft.families import detect_family
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.models.checkpoint import save_sharded
from chatglm_sft.models.loading import load_model
from chatglm_sft.tokenization.export import export_hf_tokenizer, export_thudm_tokenizer

FORMATS = ("hf", "thudm")
logger = logging.getLogger(__name__)


def export_model(
    model_dir: str | Path,
    output: str | Path,
    fmt: str = "hf",
    adapter: str | Path | None = None,
    family: str | None = None,
    dtype: str | None = None,
    max_shard_size: int = 2 * 1024**3,
) -> Path:
    """Export `model_dir` (plus a merged `adapter`) to `output` in format `fmt`, in `dtype` (default: as stored;
    float32 when merging an adapter)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    model_dir, out_dir = Path(model_dir), Path(output)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: output folder exists and is not empty")
    fam = detect_family(model_dir, family)
    if adapter is not None and dtype is None:
        # Merged weights rounded to fp16/bf16 drift from base + adapter by ~1e-3 in the logits: keep float32
        # unless the user asks for a smaller dtype.
        dtype = "float32"
    model = load_model(model_dir, dtype=dtype, family=fam.name, adapter=adapter)
    if adapter is not None:
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    has_tokenizer = (model_dir / fam.tokenizer_file).is_file()
    if not has_tokenizer:
        logger.warning("%s has no %s: exporting the weights without a tokenizer", model_dir, fam.tokenizer_file)
    if fmt == "hf":
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
        if has_tokenizer:
            export_hf_tokenizer(fam, model_dir, out_dir)
    else:
        arch = architecture_of(fam)
        save_sharded(arch.state_to_thudm(model.state_dict(), model.config), out_dir, max_shard_size)
        config = arch.config_to_thudm(model.config, fam) | {"chatglm_sft_family": fam.name}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if has_tokenizer:
            export_thudm_tokenizer(fam, model_dir, out_dir)
    return out_dir
