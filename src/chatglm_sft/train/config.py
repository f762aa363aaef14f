"""Training configuration: one dataclass, loaded from a YAML recipe and overridden from the command line."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatglm_sft.errors import UserError

METHODS = ("lora", "full", "freeze", "ptuning", "qlora")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DISTRIBUTED = ("auto", "ddp", "fsdp", "deepspeed")


@dataclass
class TrainConfig:
    """Everything `chatglm-sft train` needs; every field is also a `--flag` (underscores become dashes)."""

    model: str = ""
    """Base model folder (THUDM layout or HF-native)."""
    data: str = ""
    """Training records (JSON array or JSONL; alpaca, sharegpt, or columns with --prompt-field)."""
    output: str = ""
    """Output folder: adapter or model, checkpoints, logs, plots, the resolved config."""
    family: str | None = None
    """Override family detection."""
    format: str = "auto"
    """Record format: auto, alpaca, sharegpt or columns."""
    prompt_field: str | None = None
    """Prompt field for the columns format (e.g. `content`, `original_text`)."""
    response_field: str | None = None
    """Response field for the columns format (e.g. `summary`, `ans`)."""
    on_bad_record: str = "error"
    """`error` stops before training; `skip` trains on the good records and writes the rest to rejected.jsonl."""
    max_samples: int | None = None
    """Use only the first N good records."""
    max_length: int = 1024
    """Token limit per example; longer conversations lose their oldest rounds first."""
    last_turn_only: bool = False
    """Learn only the last assistant reply of each conversation (default: every reply)."""
    eval_split: float = 0.0
    """Fraction of records held out for evaluation (0: none)."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end when there is a held-out split)."""
    method: str = "lora"
    """lora, full, freeze, ptuning (P-Tuning v2) or qlora (4-bit NF4 base + LoRA; needs CUDA and bitsandbytes)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_targets: list[str] | None = None
    """Module names to adapt (default: the family's registry entry)."""
    freeze_trainable_layers: int = 2
    """With method freeze: how many of the last layers train."""
    pre_seq_len: int = 128
    """With method ptuning: virtual tokens of the P-Tuning v2 prefix."""
    prefix_projection: bool = False
    """With method ptuning: pass the prefix through THUDM's Linear-Tanh-Linear projection."""
    max_steps: int = 0
    """Optimizer steps (0: derive from num_epochs)."""
    num_epochs: float = 1.0
    """Epochs when max_steps is 0."""
    batch_size: int = 4
    """Examples per micro-batch per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their answer tokens."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_scheduler: str = "cosine"
    """cosine, linear or constant (after warm-up)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    precision: str = "auto"
    """auto (bf16 on GPUs that have it and on CPUs with AMX, else fp32), bf16, fp16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    packing: bool = False
    """Pack several examples per row, each attending only to itself with its own positions."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    seed: int = 42
    """Seed for data order, initialisation of new weights and dropout."""
    logging_steps: int = 1
    """Log every N optimizer steps (log.jsonl, TensorBoard, the progress bar)."""
    save_steps: int = 0
    """Write OUTPUT/checkpoint-N every N steps (0: no intermediate checkpoints)."""
    save_total_limit: int = 0
    """Keep only the newest N checkpoints (0: keep all)."""
    resume: str | None = None
    """`auto` (newest complete checkpoint in OUTPUT, if any) or a checkpoint folder."""
    max_bad_steps: int = 10
    """Abort after this many steps with a NaN/Inf loss (each one is skipped)."""
    dtype: str | None = None
    """Dtype of the frozen base weights for LoRA (default float32; bf16 halves memory)."""
    device: str | None = None
    """cpu or cuda (default: cuda when available); multi-process runs use their local rank's GPU."""
    distributed: str = "auto"
    """Multi-process strategy: ddp, fsdp (FSDP2, sharded weights/gradients/optimizer), deepspeed (ZeRO-2/3); auto
    follows `accelerate launch --use_fsdp/--use_deepspeed` and is ddp otherwise."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON for --distributed deepspeed (configs/deepspeed/zero2.json or zero3.json; default ZeRO-2)."""


def _coerce(name: str, value):
    hint = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    if value is None:
        return None
    try:
        if "list" in hint and isinstance(value, str):
            return [v for v in value.split(",") if v]
        if "bool" in hint and isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        if "int" in hint and "float" not in hint and not isinstance(value, bool):
            return int(value)
        if "float" in hint:
            return float(value)
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')}: cannot read {value!r}") from None
    return value


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """A recipe (if given) with the command-line values on top; unknown keys are errors naming them."""
    values = {}
    if path:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of options")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig()
    for key, value in values.items():
        setattr(config, key, _coerce(key, value))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    for name in ("model", "data", "output"):
        if not getattr(config, name):
            raise UserError(f"--{name} is required")
    if config.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}")
    if config.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if config.distributed not in DISTRIBUTED:
        raise UserError(f"--distributed must be one of {', '.join(DISTRIBUTED)}")
    if config.on_bad_record not in ("error", "skip"):
        raise UserError("--on-bad-record must be error or skip")
    if config.lr_scheduler not in ("cosine", "linear", "constant"):
        raise UserError("--lr-scheduler must be cosine, linear or constant")
    for name in ("batch_size", "gradient_accumulation_steps", "max_length"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def add_arguments(parser) -> None:
    """One `--flag` per field, default None so that only what the user types overrides the recipe."""
    parser.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    docs = _field_docs()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            parser.add_argument(flag, nargs="?", const="true", default=None, help=docs.get(f.name))
        else:
            parser.add_argument(flag, default=None, help=docs.get(f.name))


def _field_docs() -> dict[str, str]:
    """Field docstrings, read from the class source: they double as `--help`."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    docs, body = {}, tree.body[0].body
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = after.value.value.replace("%", "%%")
    return docs
