"""`load_model`: a local checkpoint folder (THUDM's layout or HF-native) -> a ready `PreTrainedModel`.

The model is built on the meta device and each shard's tensors are assigned into it as they are read, so peak
memory stays near the model's own size. Loading is strict: every tensor the model needs must come from the
checkpoint, and every tensor in the checkpoint must be used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import GenerationConfig, PreTrainedModel

from chatglm_sft.errors import UserError
from chatglm_sft.families import Family, detect_family, read_json
from chatglm_sft.models import huge_pages
from chatglm_sft.models.architectures import Architecture, architecture_of
from chatglm_sft.models.checkpoint import iter_shards

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


PREFIX_TENSORS = "transformer.prefix_encoder."
"""THUDM's name for a P-Tuning v2 prefix encoder's tensors."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept a `torch.dtype`, a name such as ``bf16``/``float32``, or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _is_native(raw: dict, arch: Architecture) -> bool:
    return raw.get("model_type") == arch.native_model_type


def _stored_dtype(raw: dict) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _assign_shards(
    model: PreTrainedModel,
    model_dir: Path,
    arch: Architecture,
    native: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    expected = {name: t.shape for name, t in model.state_dict().items()}
    # A saved quantized model's buffers (int8/int4 codes, bf16 scales) keep their stored dtype.
    keep_dtype = {name for name, _ in model.named_buffers()}
    # On the CPU a conversion (a copy anyway) is written into the huge pages the engine would copy the weight into.
    on_cpu = torch.device(device).type == "cpu"
    loaded: set[str] = set()
    for shard in iter_shards(model_dir):
        converted = {}
        for name, tensor in shard.items():
            if not native and name.startswith(PREFIX_TENSORS):
                continue  # a P-Tuning prefix among THUDM's weights: load_model adds it after the base
            pairs = [(name, tensor)] if native else arch.tensor_from_thudm(name, tensor, model.config)
            for new_name, new_tensor in pairs:
                if new_name not in expected:
                    raise UserError(f"{model_dir}: unexpected tensor {name!r} in checkpoint")
                if new_tensor.shape != expected[new_name]:
                    raise UserError(
                        f"{model_dir}: tensor {name!r} has shape {tuple(new_tensor.shape)}, "
                        f"config implies {tuple(expected[new_name])}"
                    )
                target = new_tensor.dtype if new_name in keep_dtype else dtype
                if on_cpu:
                    converted[new_name] = huge_pages.converted(new_tensor, target)
                else:
                    converted[new_name] = new_tensor.to(device=device, dtype=target)
        model.load_state_dict(converted, strict=False, assign=True)
        loaded.update(converted)
        del shard, converted
    missing = [n for n in expected if n not in loaded]
    if missing:
        names = sorted({n if native else arch.thudm_name(n) for n in missing})
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise UserError(f"{model_dir}: checkpoint is missing tensor(s) {shown}")


def _check_saved_quantization(model_dir: Path, saved: str, quantize: str | None, adapter) -> None:
    if quantize is not None and quantize != saved:
        raise UserError(f"{model_dir}: the model was exported quantized to {saved}; --quantize {quantize} cannot be")
    if adapter is not None:
        raise UserError(f"{model_dir}: an adapter cannot be merged into a model exported quantized; export it merged")


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    family: str | None = None,
    adapter: str | Path | None = None,
    quantize: str | None = None,
) -> PreTrainedModel:
    """Load a ChatGLM-family checkpoint folder without remote code.

    Args:
        path: a THUDM checkpoint folder (``model_type: chatglm``) or an HF-native one exported by chatglm-sft.
        dtype: compute dtype; None keeps the dtype the checkpoint is stored in.
        device: where the weights go (default CPU).
        family: override the family detection (``chatglm-6b``, ``chatglm2-6b``, ``chatglm3-6b``, ``glm-4``).
        adapter: a PEFT adapter folder to load on top (see `chatglm_sft.models.adapters`).
        quantize: ``int8`` or ``int4`` weight-only quantization for inference (an adapter is merged first).
    """
    model_dir = Path(path)
    fam: Family = detect_family(model_dir, family)
    arch = architecture_of(fam)
    raw = read_json(model_dir / "config.json")
    native = _is_native(raw, arch)
    config_path = model_dir / "config.json"
    try:
        config = arch.native_config(raw) if native else arch.config_from_thudm(raw, fam, str(config_path))
    except KeyError as e:  # the converters read the keys every checkpoint of the family has
        raise UserError(f"{config_path}: missing key {e} (not a complete {fam.name} config)") from None
    dtype = parse_dtype(dtype) or _stored_dtype(raw)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = arch.model_class(config)
    saved_quantization = raw.get("chatglm_sft_quantization")
    if saved_quantization:
        from chatglm_sft.models.quantize import finish_quantized, prepare_quantized

        _check_saved_quantization(model_dir, saved_quantization, quantize, adapter)
        quantize = None  # already quantized: the codes are loaded as they were saved
        with torch.device("meta"):
            prepare_quantized(model, saved_quantization)
    _assign_shards(model, model_dir, arch, native, dtype, device or "cpu")
    if saved_quantization:
        finish_quantized(model)
    model.config.chatglm_sft_family = fam.name
    model.generation_config = GenerationConfig(eos_token_id=fam.stop_ids, pad_token_id=fam.pad_id)
    model.eval()
    if not native and raw.get("pre_seq_len"):  # THUDM's P-Tuning layout (also what `export --format thudm` writes)
        from chatglm_sft.models.adapters import load_prefix

        model = load_prefix(model, model_dir, fam)
    if adapter is not None:
        from chatglm_sft.models.adapters import load_adapter

        model = load_adapter(model, adapter, fam)
    if quantize is not None:
        from chatglm_sft.models.quantize import quantize_model

        if adapter is not None:
            from chatglm_sft.models.adapters import merge_lora

            model = merge_lora(model)  # LoRA into the weights; a P-Tuning prefix stays in floating point
        model = quantize_model(model, quantize)
    return model
