"""Mean answer-token loss and perplexity of a model on a dataset."""

from __future__ import annotations

import math

import torch

from chatglm_sft.batches import answer_cross_entropy, answer_positions
from chatglm_sft.conversation import IGNORE_INDEX
from chatglm_sft.train.batching import pad_batch


@torch.inference_mode()
def answer_loss(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8) -> dict:
    """Token-weighted mean cross-entropy over the labelled (answer) tokens of (input_ids, labels) examples."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = {name: t.to(device) for name, t in pad_batch(chunk, pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False, logits_to_keep=answer_positions(labels)).logits
        total += answer_cross_entropy(logits, labels, reduction="sum").item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    mean = total / count if count else float("nan")
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if count else float("nan"),
        "tokens": count,
        "total": len(examples),
    }
