"""Mean answer-token loss and perplexity of a model on a dataset."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chatglm_sft.conversation import IGNORE_INDEX


@torch.inference_mode()
def answer_loss(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8) -> dict:
    """Token-weighted mean cross-entropy over the labelled (answer) tokens of (input_ids, labels) examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    for k in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[k : k + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for row, (x, y) in enumerate(chunk):
            ids[row, width - len(x) :] = torch.tensor(x)
            labels[row, width - len(y) :] = torch.tensor(y)
            mask[row, width - len(x) :] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        target = labels[:, 1:].to(device)
        total += F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((target != IGNORE_INDEX).sum())
    mean = total / count if count else float("nan")
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if count else float("nan"),
        "tokens": count,
        "total": len(examples),
    }
