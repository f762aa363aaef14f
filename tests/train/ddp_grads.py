"""Run one training step and save this process's LoRA gradients (used by test_training.py, single or torchrun)."""

import sys

import torch
import torch.distributed as dist

from chatglm_sft.train.config import load_config
from chatglm_sft.train.loop import Trainer

model, data, output, batch_size, target = sys.argv[1:6]
config = load_config(
    None,
    {
        "model": model,
        "data": data,
        "output": output,
        "batch_size": batch_size,
        "max_samples": 8,
        "precision": "fp32",
        "max_steps": 1,
        "lora_dropout": 0.0,
        "group_by_length": "false",
    },
)
trainer = Trainer(config)
trainer.train_step(0)
grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
if trainer.d.rank == 0:
    torch.save(grads, target)
if dist.is_initialized():
    dist.barrier()  # see tests/preference/ddp_pref_grads.py
    dist.destroy_process_group()
