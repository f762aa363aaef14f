"""How training is spread over processes: one process, DDP, FSDP2 or DeepSpeed ZeRO-2/3.

Each strategy wraps the model, owns the optimizer step, and saves and loads its share of the training state, so the
loop in loop.py reads the same for all of them. All of them reduce gradients as a mean over processes (DDP's
all-reduce, FSDP's reduce-scatter, ZeRO's averaged partitions); the loop scales each process's loss by
world / answer-tokens-of-the-step, which turns that mean into the token-weighted sum over the whole step.

FSDP and ZeRO-3 gather a layer's weights inside its forward pass, a collective call: every process must run the same
number of forward passes, which is why the loop gives each process the same number of micro-batches (padding with a
zero-weight example where a step runs out).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from chatglm_sft.errors import UserError
from chatglm_sft.train.config import TrainConfig
from chatglm_sft.train.methods import METHODS, decoder_layers, trainable_parameters


def choose_strategy(config: TrainConfig, world: int, environ=os.environ) -> str:
    """`single`, `ddp`, `fsdp` or `deepspeed`. `auto` follows `accelerate launch` (its `--use_fsdp` and
    `--use_deepspeed` reach us only as environment variables) and is DDP otherwise."""
    from_accelerate = None
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from_accelerate = "fsdp"
    elif environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        from_accelerate = "deepspeed"
    chosen = config.distributed
    if chosen == "auto":
        chosen = from_accelerate or "ddp"
    elif from_accelerate and from_accelerate != chosen:
        raise UserError(f"--distributed {chosen} contradicts the accelerate config, which asks for {from_accelerate}")
    if chosen in ("fsdp", "deepspeed") and "WORLD_SIZE" not in environ:
        raise UserError(
            f"--distributed {chosen} runs under a launcher: torchrun --nproc-per-node N -m chatglm_sft train … "
            "(or accelerate launch)"
        )
    if config.deepspeed_config and chosen != "deepspeed":
        raise UserError(f"--deepspeed-config applies to --distributed deepspeed, and this run is {chosen}")
    if chosen not in METHODS[config.method].strategies:
        allowed = " or ".join(s for s in METHODS[config.method].strategies if s != "single")
        raise UserError(f"--method {config.method} runs with {allowed}, not --distributed {chosen}")
    if chosen == "ddp" and world == 1:
        return "single"
    return chosen


class Strategy:
    """One process: the model as it is, AdamW, optional fp16 loss scaling (CUDA)."""

    def __init__(self, model, config: TrainConfig, device: torch.device, autocast: torch.dtype | None):
        self.model = model
        """The model as built (transformers or PEFT); its trainable parameters are what the optimizer updates."""
        self.config = config
        self.device = device
        self.autocast = autocast
        self.module = self.wrap(model)
        """What the training forward pass calls (a DDP wrapper, a DeepSpeed engine, or the model itself)."""
        self.params = [p for _, p in trainable_parameters(model)]
        self.optimizer = self.make_optimizer()
        self.scaler = torch.amp.GradScaler(enabled=autocast == torch.float16 and device.type == "cuda")

    @property
    def main(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def wrap(self, model):
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        # On a CPU, AdamW's default is its per-tensor loop: a dozen passes over every parameter and its moments. The
        # fused kernel makes one (GLM-4's two 151,552-row matrices at width 32: 119 ms a step against 20 ms).
        fused = True if self.device.type == "cpu" else None
        return torch.optim.AdamW(
            self.params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay, fused=fused
        )

    def accumulating(self):
        """Context for the backward passes of a step's micro-batches before the last (gradients stay local)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float | None:
        """Clip, apply and clear the gradients; returns the gradient norm before clipping, or None when a gradient
        is NaN/Inf: then the step is skipped with the weights and optimizer state untouched (gradients are already
        reduced, so every process sees the same norm and skips too). An fp16 GradScaler lowers its scale, as on
        every overflow it finds; otherwise it would overflow again at the same scale."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    def skip(self) -> None:
        """Drop the gradients of a step whose loss was not finite."""
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Release what the strategy holds before the process group goes."""

    def save(self, folder: Path) -> None:
        """Write the trained tensors and optimizer state (called on every process)."""
        if self.main:
            trainable = {n: t.contiguous() for n, t in self.full_state(trainable_only=True).items()}
            save_file(trainable, str(folder / "trainable.safetensors"))
            state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
            torch.save(state, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        if not (folder / "trainable.safetensors").is_file():
            raise UserError(f"{folder}: no trainable.safetensors (written with --distributed fsdp or deepspeed?)")
        params = dict(trainable_parameters(self.model))
        for name, tensor in load_file(str(folder / "trainable.safetensors")).items():
            if name not in params:
                raise UserError(f"{folder}: checkpoint tensor {name} does not exist in this model (other --method?)")
            with torch.no_grad():
                params[name].copy_(tensor)
        # Tensors and plain values only: nothing in a checkpoint runs code when it is read.
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Whole tensors on the CPU of the main process (None elsewhere); a collective call."""
        if not self.main:
            return None
        if trainable_only:
            return {n: p.detach().cpu() for n, p in trainable_parameters(self.model)}
        return {n: t.detach().cpu() for n, t in self.model.state_dict().items()}


class DDPStrategy(Strategy):
    """DistributedDataParallel: a whole replica per process, gradients all-reduced after the last micro-batch."""

    def wrap(self, model):
        return torch.nn.parallel.DistributedDataParallel(model)

    def accumulating(self):
        return self.module.no_sync()


class FSDPStrategy(Strategy):
    """PyTorch FSDP2 (`fully_shard`): every decoder layer, and the rest of the model as the root, sharded over the
    processes; parameters become DTensors, gathered for each layer's forward and backward."""

    def wrap(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dtypes = {p.dtype for p in model.parameters()}
        if len(dtypes) > 1:
            raise UserError(
                f"--distributed fsdp needs one parameter dtype, the model has {sorted(map(str, dtypes))}; "
                "leave --dtype unset"
            )
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    @contextmanager
    def accumulating(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    def save(self, folder: Path) -> None:
        """Sharded (torch.distributed.checkpoint): each process writes its own shards, nobody holds the whole."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = get_model_state_dict(self.model, options=self._options(ignore_frozen_params=True))
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(folder / "sharded"))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (folder / "sharded" / ".metadata").is_file():
            raise UserError(f"{folder}: no sharded state (was this checkpoint written without --distributed fsdp?)")
        state = {
            "model": get_model_state_dict(self.model, options=self._options(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }
        dcp.load(state, checkpoint_id=str(folder / "sharded"))
        set_model_state_dict(self.model, state["model"], options=self._options(strict=False))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    def full_state(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = self._options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.model, options=options)
        return state if self.main else None


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO (stage from the DeepSpeed JSON): optimizer state (2) and weights (3) partitioned over the
    processes. The loop keeps its own AdamW, schedule and accumulation; DeepSpeed runs in its unmanaged accumulation
    mode, where every `step()` is an optimizer step."""

    def wrap(self, model):
        return model  # the engine is built around the optimizer, in make_optimizer

    def make_optimizer(self) -> torch.optim.Optimizer:
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # otherwise DeepSpeed probes for a CUDA build
        try:
            import deepspeed
        except ImportError:
            raise UserError("--distributed deepspeed needs DeepSpeed: pip install 'chatglm-sft[deepspeed]'") from None
        if not hasattr(deepspeed.DeepSpeedEngine, "managed_gradient_accumulation"):
            raise UserError(f"--distributed deepspeed needs DeepSpeed 0.19.8 or newer (found {deepspeed.__version__})")
        self.ds_config = deepspeed_config(self.config, dist.get_world_size(), self.autocast)
        optimizer = super().make_optimizer()
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config)
        self.module = self.engine
        self.stage = self.engine.zero_optimization_stage()
        return optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        self.engine.step()
        if not self.engine.was_step_applied():  # fp16 overflow: DeepSpeed skipped it and lowered the loss scale
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip(self) -> None:
        # ZeRO has already reduced these gradients into its partitions; its step finds them non-finite and drops
        # them. If it did not, the weights are spoiled: stop rather than train on.
        self.engine.step()
        if self.engine.was_step_applied():
            raise UserError(
                "DeepSpeed applied a step whose loss was NaN/Inf (set gradient_clipping in the DeepSpeed config so "
                "that it checks gradients); resume from the last checkpoint with a lower learning rate"
            )

    def close(self) -> None:
        self.engine.destroy()

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True, save_latest=False)

    def load(self, folder: Path) -> None:
        if not (folder / "deepspeed").is_dir():
            raise UserError(f"{folder}: no DeepSpeed state (written without --distributed deepspeed?)")
        loaded, _ = self.engine.load_checkpoint(
            str(folder), tag="deepspeed", load_module_strict=False, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise UserError(f"{folder}: DeepSpeed could not read its checkpoint")

    def full_state(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        if self.stage < 3:
            return super().full_state(trainable_only)
        import deepspeed

        params = dict(self.model.named_parameters(remove_duplicate=False))
        keys = [n for n, _ in trainable_parameters(self.model)] if trainable_only else list(self.model.state_dict())
        state = {}
        for name in keys:  # one tensor at a time: the whole model never sits on one process twice
            if name not in params:  # a persistent buffer, never partitioned
                state[name] = self.model.get_buffer(name).detach().cpu()
                continue
            with deepspeed.zero.GatheredParameters([params[name]]):
                if self.main:
                    state[name] = params[name].detach().cpu().clone()
        return state if self.main else None


def deepspeed_config(config: TrainConfig, world: int, autocast: torch.dtype | None, environ=os.environ) -> dict:
    """The DeepSpeed JSON (--deepspeed-config, else the one named in the accelerate config, else ZeRO-2) with "auto"
    values filled from the training config. The optimizer and learning-rate schedule are chatglm-sft's, so sections
    defining them are an error rather than ignored."""
    chosen = config.deepspeed_config or environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if chosen:
        path = Path(chosen)
        try:
            ds = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: DeepSpeed config not found") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    else:
        stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        path, ds = Path("(default DeepSpeed config)"), {"zero_optimization": {"stage": stage}}
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UserError(
                f"{path}: remove the {section!r} section; the optimizer and schedule come from the training config "
                "(--learning-rate, --lr-scheduler, --warmup-steps, --weight-decay)"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 2 or 3 (for plain data parallelism use ddp)")
    offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        raise UserError(f"{path}: optimizer offload needs DeepSpeed's own CPU Adam, which chatglm-sft does not use")
    auto = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.batch_size * config.gradient_accumulation_steps * world,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = autocast == dtype
    ds["managed_gradient_accumulation"] = False
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW: ZeRO supports it, the check predates the list
    ds.setdefault("steps_per_print", 10**9)
    return ds


STRATEGY_CLASSES = {
    "single": Strategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": DeepSpeedStrategy,
}
