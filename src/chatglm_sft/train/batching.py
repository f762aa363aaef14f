"""Batches for training: an order over examples, and padded or packed tensors.

Padding is on the left, as at inference, so ChatGLM-6B derives its 2-D positions and prefix-LM mask from the ids
and the padding mask exactly as it does when generating. Packing puts several examples in one row; each attends
only to itself (a block-diagonal mask built from the architecture's own per-example mask) and keeps its own
positions, so the loss equals the unpacked loss.
"""

from __future__ import annotations

import random

import torch

from chatglm_sft.batches import left_pad, left_pad_ids
from chatglm_sft.conversation import IGNORE_INDEX


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[int]:
    """A shuffled order of example indices; with grouping, batches hold examples of similar length."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return order
    mega = batch_size * 50
    grouped = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        grouped += [i for batch in batches for i in batch]
    return grouped


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = left_pad_ids([x for x, _ in examples], pad_id)
    labels = left_pad([y for _, y in examples], IGNORE_INDEX, ids.shape[1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_batch(
    examples: list[tuple[list[int], list[int]]], arch, config, pad_id: int, row_length: int
) -> dict[str, torch.Tensor]:
    """Greedy first-fit packing of examples (in the given order) into rows of at most `row_length` tokens."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    for example in examples:
        for row in rows:
            if sum(len(x) for x, _ in row) + len(example[0]) <= row_length:
                row.append(example)
                break
        else:
            rows.append([example])
    width = max(sum(len(x) for x, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    allowed = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    positions = None
    for r, row in enumerate(rows):
        start = width - sum(len(x) for x, _ in row)  # left padding, like pad_batch
        for x, y in row:
            n = len(x)
            block = torch.tensor([x])
            ids[r, start : start + n] = block[0]
            labels[r, start : start + n] = torch.tensor(y)
            labels[r, start] = IGNORE_INDEX  # never learn across the boundary
            allowed[r, 0, start : start + n, start : start + n] = arch.example_attention(config, block)
            pos = arch.first_positions(config, block, torch.ones_like(block))[0]
            if positions is None:
                positions = torch.zeros((len(rows), *pos.shape[:-1], width), dtype=torch.long)
            positions[r, ..., start : start + n] = pos
            start += n
        pad = width - sum(len(x) for x, _ in row)
        idx = torch.arange(pad)
        allowed[r, 0, idx, idx] = True  # pads attend to themselves only (finite, ignored)
    return {
        "input_ids": ids,
        "attention_mask": arch.mask_for_model(allowed),
        "position_ids": positions,
        "labels": labels,
    }
