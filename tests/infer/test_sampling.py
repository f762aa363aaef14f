"""Sampling as pure functions."""

from __future__ import annotations

import torch

from chatglm_sft.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    next_tokens,
    top_k_filter,
    top_p_filter,
)


def test_top_k_keeps_k_best():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(probs.log(), 0.1)).sum() == 1  # the best token always stays


def test_repetition_penalty_hits_seen_tokens_once():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[0, 1, 0, -1]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    empty = torch.empty(3, 0, dtype=torch.long)
    assert torch.equal(next_tokens(logits, SamplingParams(), empty), logits.argmax(-1))
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=10)
    a = next_tokens(logits, params, empty, torch.Generator().manual_seed(1))
    b = next_tokens(logits, params, empty, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
