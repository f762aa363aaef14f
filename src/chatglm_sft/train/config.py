"""Training configuration: one dataclass, loaded from a YAML recipe and overridden from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatglm_sft import options
from chatglm_sft.data.formats import FORMATS
from chatglm_sft.model_options import check_device, check_family
from chatglm_sft.options import OptionError, flag, option

METHODS = ("lora", "full", "freeze", "ptuning", "qlora")
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DISTRIBUTED = ("auto", "ddp", "fsdp", "deepspeed")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Everything `chatglm-sft train` needs; every field is also a `--flag` (underscores become dashes)."""

    model: str = option("", required=True, exists="dir")
    """Base model folder (THUDM layout or HF-native)."""
    data: str = option("", required=True, exists="file")
    """Training records (JSON array or JSONL; alpaca, sharegpt, or columns with --prompt-field)."""
    output: str = option("", required=True)
    """Output folder: adapter or model, checkpoints, logs, plots, the resolved config."""
    family: str | None = None
    """Override family detection."""
    format: str = option("auto", choices=FORMATS)
    """Record format: auto, alpaca, sharegpt or columns."""
    prompt_field: str | None = None
    """Prompt field for the columns format (e.g. `content`, `original_text`)."""
    response_field: str | None = None
    """Response field for the columns format (e.g. `summary`, `ans`)."""
    on_bad_record: str = option("error", choices=("error", "skip"))
    """`error` stops before training; `skip` trains on the good records and writes the rest to rejected.jsonl."""
    max_samples: int | None = option(None, ge=1)
    """Use only the first N good records."""
    max_length: int = option(1024, ge=1)
    """Token limit per example; longer conversations lose their oldest rounds first."""
    train_on: str = option("all", choices=("all", "last"))
    """Which assistant replies are learned: all (default; each with the token after it) or the last one."""
    eval_split: float | None = option(None, gt=0, lt=1)
    """Fraction of records held out for evaluation (default: none)."""
    eval_steps: int | None = option(None, ge=1)
    """Evaluate every N optimizer steps (default: only at the end when there is a held-out split)."""
    method: str = option("lora", choices=METHODS)
    """lora, full, freeze, ptuning (P-Tuning v2) or qlora (4-bit NF4 base + LoRA; needs CUDA and bitsandbytes)."""
    lora_r: int = option(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = option(16, ge=1)
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = option(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    lora_targets: list[str] | None = None
    """Module names to adapt (default: the family's registry entry)."""
    freeze_trainable_layers: int = option(2, ge=1)
    """With method freeze: how many of the last layers train."""
    pre_seq_len: int = option(128, ge=1)
    """With method ptuning: virtual tokens of the P-Tuning v2 prefix."""
    prefix_projection: bool = False
    """With method ptuning: pass the prefix through THUDM's Linear-Tanh-Linear projection."""
    max_steps: int | None = option(None, ge=1)
    """Optimizer steps (default: derived from num_epochs)."""
    num_epochs: float = option(1.0, gt=0)
    """Epochs when max_steps is not given."""
    batch_size: int = option(4, ge=1)
    """Examples per micro-batch per process."""
    gradient_accumulation_steps: int = option(1, ge=1)
    """Micro-batches per optimizer step; the loss is averaged over all their answer tokens."""
    learning_rate: float = option(1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = option(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = option(0, ge=0)
    """Linear warm-up steps."""
    lr_scheduler: str = option("cosine", choices=SCHEDULERS)
    """cosine, linear or constant (after warm-up)."""
    max_grad_norm: float = option(1.0, ge=0)
    """Gradient clipping (0: off)."""
    precision: str = option("auto", choices=PRECISIONS)
    """auto (bf16 on GPUs that have it and on CPUs with AMX, else fp32), bf16, fp16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    reuse_cpu_memory: bool = True
    """On a CPU (Linux/glibc): keep freed memory for the next step's tensors instead of returning it and faulting it
    in again; a LoRA step of the tiny GLM-4 tool model took 0.41 s instead of 0.75 s, for ~30% more peak memory
    (train/cpu_memory.py)."""
    packing: bool = False
    """Pack several examples per row, each attending only to itself with its own positions."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    seed: int = option(42, ge=0, le=2**32 - 1)
    """Seed for data order, initialisation of new weights and dropout."""
    logging_steps: int = option(1, ge=1)
    """Log every N optimizer steps (log.jsonl, TensorBoard, the progress bar)."""
    save_steps: int | None = option(None, ge=1)
    """Write OUTPUT/checkpoint-N every N steps (default: no intermediate checkpoints)."""
    save_total_limit: int | None = option(None, ge=1)
    """Keep only the newest N checkpoints (default: keep all)."""
    resume: str | None = None
    """`auto` (newest complete checkpoint in OUTPUT, if any) or a checkpoint folder."""
    max_skipped_steps: int = option(10, ge=0)
    """Stop when more than this many optimizer steps in a row were skipped for a NaN/Inf loss or gradient."""
    dtype: str | None = option(None, choices=DTYPES)
    """Dtype of the frozen base weights for LoRA (default float32; bf16 halves memory)."""
    device: str | None = None
    """cpu or cuda (default: cuda when available); multi-process runs use their local rank's GPU."""
    distributed: str = option("auto", choices=DISTRIBUTED)
    """Multi-process strategy: ddp, fsdp (FSDP2, sharded weights/gradients/optimizer), deepspeed (ZeRO-2/3); auto
    follows `accelerate launch --use_fsdp/--use_deepspeed` and is ddp otherwise."""
    deepspeed_config: str | None = option(None, exists="file")
    """DeepSpeed JSON for --distributed deepspeed (configs/deepspeed/zero2.json or zero3.json; default ZeRO-2)."""
    objective: str = option("sft", choices=OBJECTIVES)
    """sft (answer-token cross-entropy) or a preference objective on pairs: dpo, orpo, simpo (docs/preference.md)."""
    beta: float | None = option(None, gt=0)
    """dpo and simpo: the β scaling the log-probability differences (default: the objective's own, dpo 0.1 as in
    TRL and the DPO paper, simpo 2.0 as in the SimPO paper and torchtune: SimPO compares per-token averages, which
    differ far less than DPO's sums)."""
    label_smoothing: float = option(0.0, ge=0, lt=0.5)
    """dpo and simpo: probability that a pair's preference is flipped (conservative loss)."""
    simpo_gamma: float = option(0.5, ge=0)
    """simpo: the target reward margin γ."""
    orpo_lambda: float = option(0.1, gt=0)
    """orpo: weight λ of the odds-ratio term beside the chosen reply's NLL."""
    rpo_alpha: float = option(0.0, ge=0)
    """dpo: weight α of the chosen reply's per-token NLL added to the loss (TRL's rpo_alpha; default 0: plain DPO)."""
    ref_model: str | None = option(None, exists="dir")
    """dpo: a separate reference model folder (default: the model training starts from)."""
    ref_adapter: str | None = option(None, exists="dir")
    """lora/qlora: start from this (SFT) adapter and continue training it; the reference is base + this adapter."""
    precompute_ref: bool = False
    """dpo: compute the reference log-probabilities once before training (no reference model kept in memory)."""

    def check_options(self) -> None:
        """Rules that `option(...)` cannot say, checked with the others before anything loads."""
        check_family(self.family)
        check_device(self.device)
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            raise OptionError(f"--resume {self.resume}: expected auto or a checkpoint folder")
        self._check_objective_options()

    def _check_objective_options(self) -> None:
        """Options that mean something only to objectives with some property (`OBJECTIVE_ONLY`), refused naming the
        option and the objectives it is for."""
        for names, needs, lacks, hint in OBJECTIVE_ONLY:
            given = [flag(name) for name in names if getattr(self, name)]
            if not given:
                continue
            from chatglm_sft.train.objectives import OBJECTIVES as RECORDS  # (imports torch: only when it matters)

            if not getattr(RECORDS[self.objective], needs):
                users = ", ".join(name for name, o in RECORDS.items() if getattr(o, needs))
                raise OptionError(f"{given[0]}: --objective {self.objective} {lacks} (only {users}{hint})")


OBJECTIVE_ONLY = (
    (("ref_model", "ref_adapter", "precompute_ref"), "reference", "uses no reference model", ""),
    # TRL's ORPOConfig calls ORPO's λ `beta`, so the hint.
    (("beta",), "beta", "has no β", "; ORPO's weight is --orpo-lambda"),
)
"""(options, the `Objective` field they need, what an objective without it lacks, a hint for the message)."""


def load_config(path: str | Path | None, overrides: dict, check_paths_exist: bool = False) -> TrainConfig:
    """A recipe (if given) with the command-line values on top, converted and range-checked; unknown keys are
    errors naming them. With `check_paths_exist`, the model, data and DeepSpeed config must exist too."""
    values = {}
    if path:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise OptionError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise OptionError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(values, dict):
            raise OptionError(f"--config {path}: expected a mapping of options")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return options.build(TrainConfig, values, source=str(path) if path else None, check_paths_exist=check_paths_exist)


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def add_arguments(parser) -> None:
    """`--config` and one `--flag` per field."""
    parser.add_argument("--config", default=None, help="YAML recipe (see configs/); flags override it")
    options.add_options(parser, TrainConfig)
