"""Left-padded batches and the answer-token loss: one of each, shared by training, `eval --task loss`, the inference
engine and the ChatGLM-6B model.

Padding is on the left everywhere, so a prompt's last token is the batch's last column at inference and ChatGLM-6B
derives the same positions and prefix-LM mask from ids and padding mask when training as when generating.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from chatglm_sft.conversation import IGNORE_INDEX
from chatglm_sft.cross_entropy import cross_entropy_in_place


def left_pad(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> torch.Tensor:
    """[len(rows), width] long tensor: each row right-aligned, `value` before it (width: the longest row)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


def left_pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids left-padded with `pad_id`, and the attention mask (1 on real tokens)."""
    ids = left_pad(rows, pad_id)
    mask = left_pad([[1] * len(r) for r in rows], 0, ids.shape[1])
    return ids, mask


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: positions whose next token is learned, i.e. where logits are needed (`logits_to_keep`)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", overwrite_logits: bool = False
) -> torch.Tensor:
    """Cross-entropy of every learned token given the tokens before it, in float32, summed or averaged over those
    tokens. `logits`: [B, L, V] for every position, or [N, V] for only the `answer_positions(labels)`.
    `overwrite_logits`: a training step's loss, whose logits nothing else reads: computed in their memory, with
    less memory and time for the backward (`chatglm_sft.cross_entropy`)."""
    target = labels[:, 1:]
    learned = target != IGNORE_INDEX
    if logits.dim() == 3:
        logits = logits[:, :-1][learned]
    logits, target = logits.float().reshape(-1, logits.shape[-1]), target[learned]
    if not overwrite_logits:
        return F.cross_entropy(logits, target, reduction=reduction)
    losses = cross_entropy_in_place(logits, target)
    return losses.sum() if reduction == "sum" else losses.mean()
