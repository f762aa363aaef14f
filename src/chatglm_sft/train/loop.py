"""`chatglm-sft train`: an explicit training loop, resumable to the exact step, single- or multi-process.

The data order of every optimizer step is a pure function of (seed, step), so a resumed run picks up exactly where
the checkpoint left off, and each process of a DDP run takes its share of the same examples. The loss of a step is
the mean over all answer tokens of all its micro-batches on all processes (token-weighted, as if the whole step
were one batch), which also makes 2-process gradients equal 1-process gradients on the doubled batch.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from chatglm_sft.batches import answer_cross_entropy, answer_positions
from chatglm_sft.conversation import IGNORE_INDEX
from chatglm_sft.data.dataset import (
    cache_key,
    cached_columns,
    check_records,
    tokenize_records,
    write_rejected,
)
from chatglm_sft.errors import UserError
from chatglm_sft.families import detect_family
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.train import checkpoints
from chatglm_sft.train.batching import epoch_order, pack_batch, pad_batch
from chatglm_sft.train.config import TrainConfig, load_config, to_dict
from chatglm_sft.train.cpu_memory import keep_freed_memory
from chatglm_sft.train.methods import METHODS, prepare_model, save_result, trainable_only
from chatglm_sft.train.objectives import OBJECTIVES
from chatglm_sft.train.parallel import STRATEGY_CLASSES, choose_strategy


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(config: TrainConfig) -> tuple[Dist, str]:
    """This process's place in the run, and the strategy (see parallel.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    strategy = choose_strategy(config, world)
    cuda = torch.cuda.is_available() and (config.device or "cuda").startswith("cuda")
    launched = strategy != "single"
    device = torch.device(f"cuda:{local}" if cuda and launched else (config.device or ("cuda" if cuda else "cpu")))
    if launched and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device), strategy


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full float32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amx = "AMX" in torch.backends.cpu.get_cpu_capability() or "amx_bf16" in _cpu_flags()
    return torch.bfloat16 if amx else None


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def lr_factor(step: int, config: TrainConfig, total: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_scheduler == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cached_by_rank0(d: Dist, cache_dir: Path, key: str, build) -> dict:
    """`cached_columns` where rank 0 builds a missing cache while the other ranks wait, then read it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if d.world > 1 and not d.main:
        dist.barrier()  # let rank 0 build the cache first
    columns = cached_columns(cache_dir, key, build)
    if d.world > 1 and d.main:
        dist.barrier()
    return columns


def _say(d: Dist, message: str) -> None:
    if d.main:
        print(message, flush=True)


def load_data(config: TrainConfig, tokenizer, family, out: Path, d: Dist):
    """Validated, tokenized (cached) examples split into train and eval."""
    report = check_records(config.data, config.format, config.prompt_field, config.response_field, family)
    if report.bad:
        if config.on_bad_record == "error":
            raise UserError(
                f"{report.bad[0]} ({len(report.bad)} bad record(s) of {report.read}; run "
                "`chatglm-sft data check` for all of them, or pass --on-bad-record skip)"
            )
        if d.main:
            write_rejected(report.bad, out / "rejected.jsonl")
        _say(d, f"skipping {len(report.bad)} bad record(s) of {report.read}; they are in {out / 'rejected.jsonl'}")
    conversations = [messages for _, messages in report.good][: config.max_samples or None]
    if not conversations:
        raise UserError(f"{config.data}: no usable records")
    settings = {
        "family": family.name,
        "max_length": config.max_length,
        "train_on": config.train_on,
        "format": config.format,
        "prompt_field": config.prompt_field,
        "response_field": config.response_field,
        "max_samples": config.max_samples,
        "on_bad_record": config.on_bad_record,
    }
    cache_dir = out / "cache"

    def build():
        tokenized = tokenize_records(tokenizer, conversations, config.max_length, config.train_on == "last")
        if tokenized.truncated:
            _say(
                d,
                f"{tokenized.truncated} example(s) longer than {config.max_length} tokens were shortened "
                "(oldest rounds first)",
            )
        return {"input_ids": tokenized.input_ids, "labels": tokenized.labels}

    columns = cached_by_rank0(d, cache_dir, cache_key(config.data, config.model, family, settings), build)
    examples = list(zip(columns["input_ids"], columns["labels"], strict=True))
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    n_eval = int(len(examples) * (config.eval_split or 0.0))
    eval_set = [examples[i] for i in sorted(order[:n_eval])]
    train_set = [examples[i] for i in sorted(order[n_eval:])]
    if not train_set:
        raise UserError(f"--eval-split {config.eval_split} leaves none of the {len(examples)} examples to train on")
    return train_set, eval_set


def answer_tokens(labels: list[int]) -> int:
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.d, strategy = setup_distributed(config)
        self.out = Path(config.output)
        METHODS[config.method].check_device(self.d.device)
        if self.d.device.type == "cpu" and config.reuse_cpu_memory:
            keep_freed_memory()
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.yaml").write_text(yaml.safe_dump(to_dict(config), allow_unicode=True))
        import chatglm_sft

        self.family = detect_family(config.model, config.family)
        self.arch = architecture_of(self.family)
        self.tokenizer = chatglm_sft.load_tokenizer(config.model, family=self.family.name)
        self.train_set, self.eval_set = self.load_examples()
        self.autocast = resolve_precision(config.precision, self.d.device)
        base_dtype = METHODS[config.method].base_dtype(config)
        model = chatglm_sft.load_model(config.model, dtype=base_dtype, device=self.d.device, family=self.family.name)
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
        torch.manual_seed(config.seed)
        self.model = prepare_model(model, config, self.family)
        self.model.train()
        self.parallel = STRATEGY_CLASSES[strategy](self.model, config, self.d.device, self.autocast)
        self.optimizer = self.parallel.optimizer
        per_step = config.batch_size * config.gradient_accumulation_steps * self.d.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_set) / per_step))
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config, self.total_steps)
        )
        self.state = checkpoints.TrainState()
        self._orders: dict[int, list[int]] = {}

    def load_examples(self) -> tuple[list, list]:
        """Training and held-out examples (`chatglm_sft.train.preference` reads pairs instead)."""
        return load_data(self.config, self.tokenizer, self.family, self.out, self.d)

    def extra_metrics(self) -> dict:
        """More values for the step's log entry (the preference objectives' rewards)."""
        return {}

    # --- data of a step ------------------------------------------------------------------------------------------

    def example_length(self, example) -> int:
        """What `group_by_length` sorts by: an example's length in tokens."""
        ids, _ = example
        return len(ids)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            lengths = [self.example_length(e) for e in self.train_set]
            c = self.config
            self._orders = {epoch: epoch_order(lengths, c.batch_size, c.seed, epoch, c.group_by_length)}
        return self._orders[epoch]

    def step_indices(self, step: int) -> list[int]:
        """The training examples of optimizer step `step`, on all processes together."""
        c = self.config
        epoch, within = divmod(step, self.steps_per_epoch)
        per_step = c.batch_size * c.gradient_accumulation_steps * self.d.world
        return self._order(epoch)[within * per_step : (within + 1) * per_step]

    def micro_batches(self, indices: list[int]) -> list[tuple[list, float]]:
        """This process's micro-batches of a step's examples with their loss weights. Every process gets the same
        number of micro-batches (FSDP and ZeRO-3 need equal forward passes); one whose share of a short last
        micro-batch is empty runs an example at weight 0."""
        per_micro = self.config.batch_size * self.d.world
        micro = []
        for start in range(0, len(indices), per_micro):
            mine, weight = self._share(indices[start : start + per_micro])
            micro.append(([self.train_set[i] for i in mine], weight))
        return micro

    def step_examples(self, step: int) -> tuple[list[tuple[list[tuple], float]], int]:
        """This process's micro-batches for `step` with their loss weights, and the answer-token count of the whole
        step (all processes)."""
        indices = self.step_indices(step)
        return self.micro_batches(indices), sum(answer_tokens(self.train_set[i][1]) for i in indices)

    def _share(self, chunk: list) -> tuple[list, float]:
        """This process's contiguous part of `chunk` (parts differ in size by at most one), weight 1; or, when it
        is empty, the chunk's first item at weight 0."""
        d = self.d
        mine = chunk[d.rank * len(chunk) // d.world : (d.rank + 1) * len(chunk) // d.world]
        return (mine, 1.0) if mine else (chunk[:1], 0.0)

    def tensors(self, examples) -> dict[str, torch.Tensor]:
        if self.config.packing:
            batch = pack_batch(
                examples,
                self.arch,
                self.model.config,
                self.family.pad_id,
                max(self.config.max_length, max(len(x) for x, _ in examples)),
            )
        else:
            batch = pad_batch(examples, self.family.pad_id)
        return {k: v.to(self.d.device) for k, v in batch.items()}

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the answer tokens. Logits are computed only where a label follows: with a
        65k-150k vocabulary the output layer is most of the work, and prompts and padding need none."""
        labels = batch.pop("labels")
        with torch.autocast(
            self.d.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
        ):
            logits = model(**batch, use_cache=False, logits_to_keep=answer_positions(labels)).logits
        return answer_cross_entropy(logits, labels, reduction="sum", overwrite_logits=True)

    # --- the loop -------------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[float, int]:
        micro, tokens = self.step_examples(step)
        scale = self.d.world / max(1, tokens)
        local_sum = 0.0
        for k, (examples, weight) in enumerate(micro):
            batch = self.tensors(examples)
            last = k == len(micro) - 1
            with nullcontext() if last else self.parallel.accumulating():
                loss = self.loss_sum(self.parallel.module, batch)
                self.parallel.backward(loss * (scale * weight))
            local_sum += loss.item() * weight
        (total_sum,) = self.d.all_sum([local_sum])
        return total_sum / max(1, tokens), tokens

    def optimizer_step(self, loss: float) -> bool:
        """Apply the step, or skip it when its loss or a gradient is NaN/Inf (weights, optimizer state and schedule
        stay as they were); returns whether it was applied. Too many skipped steps in a row stop the run."""
        if math.isfinite(loss):
            self.last_grad_norm = self.parallel.step()
            if self.last_grad_norm is not None:
                self.scheduler.step()
                self.state.skipped_in_a_row = 0
                return True
            reason = "a gradient was NaN/Inf"
        else:
            self.parallel.skip()
            reason = "the loss was NaN/Inf"
        self.state.skipped_steps += 1
        self.state.skipped_in_a_row += 1
        self.last_skip_reason = reason
        if self.state.skipped_in_a_row > self.config.max_skipped_steps:
            raise UserError(
                f"step {self.state.step + 1}: {reason}, and {self.state.skipped_in_a_row} steps in a row were skipped "
                f"(more than --max-skipped-steps {self.config.max_skipped_steps}); lower the learning rate, "
                "check the data, or use --precision fp32"
            )
        return False

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_set:
            return None
        self.model.eval()
        total, tokens = 0.0, 0.0
        per_batch = self.config.batch_size * self.d.world
        for start in range(0, len(self.eval_set), per_batch):
            mine, weight = self._share(self.eval_set[start : start + per_batch])
            total += self.loss_sum(self.model, self.tensors(mine)).item() * weight
            tokens += sum(answer_tokens(y) for _, y in mine) * weight
        self.model.train()
        total, tokens = self.d.all_sum([total, tokens])
        return total / max(1.0, tokens)

    def run(self) -> Path:
        c = self.config
        start = checkpoints.resume(self) if c.resume else 0
        log = checkpoints.Log(self.out, self.d.main, self.state)
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", disable=not self.d.main)
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(start, self.total_steps):
            loss, tokens = self.train_step(step)
            learning_rate = self.scheduler.get_last_lr()[0]
            applied = self.optimizer_step(loss)
            window_tokens += tokens
            self.state.step = step + 1
            if not applied:
                log.write({"step": self.state.step, "skipped": self.last_skip_reason})
                bar.set_postfix(skipped=self.state.skipped_steps)
            elif self.state.step % c.logging_steps == 0 or self.state.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                entry = {
                    "step": self.state.step,
                    "loss": loss,
                    "learning_rate": learning_rate,
                    "grad_norm": self.last_grad_norm,
                    "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                    "epoch": step / self.steps_per_epoch,
                    **self.extra_metrics(),
                }
                log.write(entry)
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{entry['learning_rate']:.2e}",
                    tok_s=f"{entry['tokens_per_second']:.0f}",
                    skipped=self.state.skipped_steps,
                )
                window_tokens, window_start = 0, time.perf_counter()
            if c.eval_steps and self.state.step % c.eval_steps == 0:
                self._log_eval(log)
            bar.update(1)
            if c.save_steps and self.state.step % c.save_steps == 0 and self.state.step < self.total_steps:
                checkpoints.save(self)
        bar.close()
        if self.eval_set and not (c.eval_steps and self.state.step % c.eval_steps == 0):
            self._log_eval(log)
        state = self.parallel.full_state(trainable_only(c.method))
        if self.d.main:
            save_result(self.model, self.out, c, c.model, self.family, state)
            log.plot()
        log.close()
        if self.d.world > 1:
            # The others wait until the result is written. Under DeepSpeed a process that finished early was seen
            # to abort at exit ("terminate called without an active exception"), and the launcher then killed the
            # main process mid-save.
            dist.barrier()
        self.parallel.close()
        skipped = self.state.skipped_steps
        _say(self.d, f"done: {self.state.step} steps, {skipped} skipped (NaN/Inf); result in {self.out}")
        return self.out

    def _log_eval(self, log) -> None:
        eval_loss = self.evaluate()
        if eval_loss is not None:
            log.write({"step": self.state.step, "eval_loss": eval_loss})


def train(config: TrainConfig) -> Path:
    trainer_class = Trainer
    if OBJECTIVES[config.objective].data == "pairs":
        from chatglm_sft.train.preference import PreferenceTrainer as trainer_class
    trainer = trainer_class(config)
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_with(**settings) -> Path:
    """`chatglm-sft train` as a call: `TrainConfig` fields by name (paths may be `Path`s), checked as the CLI checks
    them; returns the output folder."""
    return train(load_config(None, {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}))
