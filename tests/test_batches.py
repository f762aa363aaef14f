"""One left padding and one answer-token loss for training, evaluation, inference and the ChatGLM-6B model."""

from __future__ import annotations

import math

import pytest
import torch

from chatglm_sft.batches import IGNORE_INDEX, answer_cross_entropy, answer_positions, left_pad_ids
from chatglm_sft.cross_entropy import cross_entropy_in_place
from chatglm_sft.train.batching import pad_batch


def test_left_padding_is_the_same_for_prompts_and_training_examples():
    rows = [[5, 6, 7], [8], [9, 10]]
    ids, mask = left_pad_ids(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    batch = pad_batch([(r, [IGNORE_INDEX] * (len(r) - 1) + r[-1:]) for r in rows], pad_id=0)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, -100, 8], [-100, -100, 10]]


def test_answer_loss_from_all_logits_equals_the_kept_ones_and_a_direct_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, -100, -100, -100, 7]])
    kept = logits[answer_positions(labels)]
    assert kept.shape == (4, 11)
    direct = sum(
        -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
        for b in range(2)
        for t in range(1, 5)
        if labels[b, t] != IGNORE_INDEX
    )
    assert math.isclose(answer_cross_entropy(logits, labels, "sum").item(), direct, rel_tol=1e-6)
    assert math.isclose(answer_cross_entropy(kept, labels, "sum").item(), direct, rel_tol=1e-6)
    assert math.isclose(answer_cross_entropy(logits, labels).item(), direct / 4, rel_tol=1e-6)


def test_the_training_loss_in_the_logits_memory_equals_cross_entropy_with_its_gradients():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, 8), torch.randn(50, 8) * 3
    labels = torch.tensor([[-100, -100, 3, 4, 5, 49], [-100, -100, -100, -100, 7, 0]])
    results = []
    for overwrite in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        for reduction in ("sum", "mean"):
            # [N, V] as training keeps them, and [B, L, V]; a product, so the gradient must flow back through it
            kept = h[answer_positions(labels)] @ w.T
            loss = answer_cross_entropy(kept, labels, reduction, overwrite_logits=overwrite)
            loss = loss + answer_cross_entropy(h @ w.T, labels, reduction, overwrite_logits=overwrite)
            (loss * 3).backward()
            results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for reference, in_place in zip(results[:2], results[2:], strict=True):
        for a, b in zip(reference, in_place, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().sum() > 0


def test_the_in_place_loss_refuses_logits_that_a_backward_still_needs_and_a_second_backward():
    logits = torch.randn(3, 7, requires_grad=True)
    scaled = logits * 2
    kept = scaled.exp()  # exp's backward reads its output: overwriting it would give a wrong gradient silently
    loss = cross_entropy_in_place(kept, torch.tensor([0, 1, 2])).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    twice = cross_entropy_in_place(torch.randn(3, 7, requires_grad=True) * 1, torch.tensor([0, 1, 2])).sum()
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        twice.backward()
    with pytest.raises(TypeError, match="float32 or float64"):
        cross_entropy_in_place(torch.randn(2, 4, dtype=torch.bfloat16), torch.tensor([0, 1]))
