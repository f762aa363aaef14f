"""Reading and writing weight files: safetensors or `.bin`, single files or sharded with an index.

Shards are read one at a time so that loading never holds more than the model plus one shard. `.bin` files are
only ever opened with ``torch.load(weights_only=True)``: a pickle from the internet must not run code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatglm_sft.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in index order; an error names any shard that is missing."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = model_dir / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index_path}: not a valid weight index ({e})") from None
            shards = list(dict.fromkeys(weight_map.values()))
            for shard in shards:
                if not (model_dir / shard).is_file():
                    raise UserError(f"{model_dir / shard}: shard listed in {index_name} is missing")
            return [model_dir / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise UserError(
        f"{model_dir}: no weights found (expected {SAFE_INDEX}, {BIN_INDEX}, model.safetensors or pytorch_model.bin)"
    )


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, on the CPU; an unreadable or truncated file is an error naming it."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors and torch raise many types for a damaged file
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def iter_shards(model_dir: Path) -> Iterator[dict[str, torch.Tensor]]:
    """Yield each shard's tensors in turn."""
    for path in weight_files(model_dir):
        yield read_shard(path)


def save_sharded(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write `state` as safetensors shards plus an index (a single `model.safetensors` when it fits in one)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
