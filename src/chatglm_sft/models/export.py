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
from chatglm_sft.models.adapters import is_prefix, merge_lora
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
    quantize: str | None = None,
) -> Path:
    """Export `model_dir` (plus a merged `adapter`) to `output` in format `fmt`, in `dtype` (default: as stored;
    float32 when merging an adapter); `quantize` (int8/int4, hf only) writes the quantized weights, which load
    without quantizing again."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize is not None and fmt != "hf":
        raise UserError(f"--quantize {quantize}: quantized weights are written in the hf format only")
    model_dir, out_dir = Path(model_dir), Path(output)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: output folder exists and is not empty")
    fam = detect_family(model_dir, family)
    if adapter is not None and dtype is None:
        # Merged weights rounded to fp16/bf16 drift from base + adapter by ~1e-3 in the logits: keep float32
        # unless the user asks for a smaller dtype.
        dtype = "float32"
    prefix = adapter is not None and is_prefix(adapter)
    if prefix and fmt != "thudm":
        raise UserError(
            f"--adapter {adapter}: a P-Tuning v2 prefix cannot be merged into weights; export it with --format thudm "
            "(THUDM's layout keeps the prefix beside the weights), or serve the base model with "
            f"--adapter {adapter} (predict, chat, serve and webui load it)"
        )
    model = load_model(model_dir, dtype=dtype, family=fam.name, adapter=adapter)
    model = merge_lora(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_tokenizer = (model_dir / fam.tokenizer_file).is_file()
    if not has_tokenizer:
        logger.warning("%s has no %s: exporting the weights without a tokenizer", model_dir, fam.tokenizer_file)
    if fmt == "hf" and quantize is not None:
        _save_quantized(model, out_dir, quantize, max_shard_size)
        if has_tokenizer:
            export_hf_tokenizer(fam, model_dir, out_dir)
    elif fmt == "hf":
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
        if has_tokenizer:
            export_hf_tokenizer(fam, model_dir, out_dir)
    else:
        arch = architecture_of(fam)
        state, prefix_state = _split_prefix(model.state_dict(), arch.prefix_module)
        thudm = _own_storage(arch.state_to_thudm(state, model.config) | prefix_state)
        save_sharded(thudm, out_dir, max_shard_size)
        config = arch.config_to_thudm(model.config, fam) | {"chatglm_sft_family": fam.name}
        if prefix_state:  # THUDM's P-Tuning checkpoints: the prefix encoder among the weights, its size in config
            config |= {"pre_seq_len": model.config.pre_seq_len, "prefix_projection": model.config.prefix_projection}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if has_tokenizer:
            export_thudm_tokenizer(fam, model_dir, out_dir)
    return out_dir


def _save_quantized(model, out_dir: Path, mode: str, max_shard_size: int) -> None:
    """The HF-native folder of `model` with its linear layers quantized (see `models.quantize.quantized_state`)."""
    from chatglm_sft.models.quantize import quantized_state

    save_sharded(quantized_state(model, mode), out_dir, max_shard_size)
    model.config.chatglm_sft_quantization = mode
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def _split_prefix(state: dict, prefix_module: str) -> tuple[dict, dict]:
    """The base model's tensors, and a P-Tuning prefix encoder's under THUDM's `transformer.prefix_encoder.`."""
    head = prefix_module + "."
    prefix = {"transformer.prefix_encoder." + k.removeprefix(head): v for k, v in state.items() if k.startswith(head)}
    return {k: v for k, v in state.items() if not k.startswith(head)}, prefix


def _own_storage(state: dict) -> dict:
    """Tensors that share memory (ChatGLM-6B's per-layer rotary `inv_freq` buffers) copied apart: safetensors
    refuses to write shared storage."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out
