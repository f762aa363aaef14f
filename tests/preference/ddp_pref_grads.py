"""One preference training step; saves this process's LoRA gradients and the step's loss and metrics (used by
test_preference_distributed.py, single process or under torchrun)."""

import sys

import torch

from chatglm_sft.train.config import load_config
from chatglm_sft.train.preference import PreferenceTrainer

model, data, output, batch_size, objective, strategy, target = sys.argv[1:8]
config = load_config(
    None,
    {
        "model": model,
        "data": data,
        "output": output,
        "objective": objective,
        "distributed": strategy,
        "batch_size": batch_size,
        "max_samples": 8,
        "precision": "fp32",
        "max_steps": 1,
        "group_by_length": "false",
    },
)
trainer = PreferenceTrainer(config)
loss, _ = trainer.train_step(0)
grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
if trainer.d.rank == 0:
    torch.save({"grads": grads, "loss": loss, "metrics": trainer.step_metrics}, target)
if trainer.d.world > 1:
    # Wait for rank 0's save: a gloo process that tears down while its peer still works can abort at exit
    # ("terminate called without an active exception"), as train/loop.py notes.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
