"""Checkpoints (atomic, resumable to the exact step) and the training log (log.jsonl, TensorBoard, loss.png)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chatglm_sft.errors import UserError
from chatglm_sft.train.methods import METHODS
from chatglm_sft.train.reward_plot import add_reward_curves

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainState:
    step: int = 0
    skipped_steps: int = 0
    """Steps skipped for a NaN/Inf loss or gradient (each still consumed its data)."""
    skipped_in_a_row: int = 0
    history: list[dict] = field(default_factory=list)
    """Every log entry so far (train and eval), carried in checkpoints so a resumed log is whole."""


def complete_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first; a killed save leaves only a `.tmp-` folder, never one of these."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save(trainer) -> Path:
    """Write OUTPUT/checkpoint-N under a temporary name (every process writes its share), then rename it into
    place once all have finished."""
    out, step, d = trainer.out, trainer.state.step, trainer.d
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(d)
    trainer.parallel.save(tmp)
    _save_rng(tmp / f"rng-{d.rank}.pt")
    adapter = trainer.parallel.full_state(trainable_only=True) if METHODS[trainer.config.method].adapter else None
    if d.main:
        if adapter is not None:
            trainer.model.save_pretrained(tmp, state_dict=adapter)  # a usable adapter as well
        torch.save({"scheduler": trainer.scheduler.state_dict()}, tmp / "scheduler.pt")
        state = asdict(trainer.state) | {"run": run_identity(trainer)}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    _barrier(d)
    if d.main:
        tmp.rename(final)
        _prune(out, trainer.config.save_total_limit)
    _barrier(d)
    return final


def _barrier(d) -> None:
    if d.world > 1:
        torch.distributed.barrier()


def _save_rng(path: Path) -> None:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def _prune(out: Path, limit: int | None) -> None:
    if limit:
        for old in complete_checkpoints(out)[:-limit]:
            shutil.rmtree(old)


def run_identity(trainer) -> dict:
    """What must be the same for a resumed run to continue the one that wrote the checkpoint."""
    c = trainer.config
    return {
        "batch_size": c.batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "world_size": trainer.d.world,
        "method": c.method,
        "model": model_fingerprint(Path(c.model)),
        "data": file_digest(Path(c.data)),
    }


def model_fingerprint(folder: Path) -> str:
    """The model's config and the names and sizes of its files (cheap: weights are not read)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_same_run(folder: Path, saved: dict | None, current: dict) -> None:
    """Refuse to resume, naming every difference, when the checkpoint was written by another kind of run."""
    if saved is None:
        raise UserError(f"{folder}: the checkpoint does not record its run settings (written by an older version)")
    labels = {"model": "model files", "data": "data file content"}
    differences = [
        f"{labels.get(key, '--' + key.replace('_', '-'))} {saved.get(key)} -> {value}"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if differences:
        raise UserError(f"cannot resume from {folder}: this run differs from it: " + "; ".join(differences))


def resume(trainer) -> int:
    """Restore from `--resume auto|DIR`; returns the step to continue from (0 when auto finds nothing)."""
    choice = trainer.config.resume
    if choice == "auto":
        found = complete_checkpoints(trainer.out)
        if not found:
            return 0
        folder = found[-1]
    else:
        folder = Path(choice)
        if not (folder / "trainer_state.json").is_file():
            raise UserError(f"{folder}: not a complete checkpoint (no trainer_state.json)")
    state = json.loads((folder / "trainer_state.json").read_text())
    check_same_run(folder, state.get("run"), run_identity(trainer))
    trainer.parallel.load(folder)
    # Tensors and plain values only (weights_only): nothing in a checkpoint runs code when it is read.
    schedule = torch.load(folder / "scheduler.pt", weights_only=True)
    trainer.scheduler.load_state_dict(schedule["scheduler"])
    trainer.state.step = state["step"]
    trainer.state.skipped_steps = state.get("skipped_steps", 0)
    trainer.state.skipped_in_a_row = state.get("skipped_in_a_row", 0)
    trainer.state.history = state["history"]
    rank_rng = folder / f"rng-{trainer.d.rank}.pt"
    rng = torch.load(rank_rng if rank_rng.is_file() else folder / "rng-0.pt", weights_only=True)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if trainer.d.main:
        print(f"resuming from {folder} at step {trainer.state.step}", flush=True)
    return trainer.state.step


class Log:
    """log.jsonl (rewritten from the state on resume, so it never holds steps a crash made void), TensorBoard."""

    def __init__(self, out: Path, main: bool, state: TrainState):
        self.out, self.main, self.state = out, main, state
        self.writer = None
        if main:
            with (out / "log.jsonl").open("w") as f:
                for entry in state.history:
                    f.write(json.dumps(entry) + "\n")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def write(self, entry: dict) -> None:
        self.state.history.append(entry)
        if not self.main:
            return
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key if key.startswith("eval") else f"train/{key}", value, entry["step"])

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(e["step"], e["loss"]) for e in self.state.history if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in self.state.history if "eval_loss" in e]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        add_reward_curves(ax, self.state.history)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
