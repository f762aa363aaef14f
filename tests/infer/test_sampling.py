"""Sampling as pure functions."""

from __future__ import annotations

import pytest
import torch

from chatglm_sft.errors import UserError
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


LOGITS = torch.tensor([[4.0, 3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -3.0]])
EMPTY = torch.empty(1, 0, dtype=torch.long)


def draws(params: SamplingParams, n: int = 2000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """`n` tokens drawn for one row of `logits` (one call per batch of identical rows)."""
    batch = logits.expand(n, -1)
    return next_tokens(batch, params, EMPTY.expand(n, 0), torch.Generator().manual_seed(0))


def test_samples_stay_inside_the_top_k_set():
    for k in (1, 2, 3):
        tokens = draws(SamplingParams(temperature=1.0, top_k=k))
        assert set(tokens.tolist()) == set(range(k))  # every one of the k best is drawn, nothing else


def test_samples_stay_inside_the_top_p_set():
    probs = LOGITS.softmax(-1)[0]  # 0.58, 0.21, 0.13, 0.08, ...
    nucleus = int((probs.cumsum(0) < 0.85).sum()) + 1
    tokens = draws(SamplingParams(temperature=1.0, top_p=0.85))
    assert set(tokens.tolist()) == set(range(nucleus)) and nucleus == 3
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01)).tolist()) == {0}


def test_top_k_and_top_p_combine():
    tokens = draws(SamplingParams(temperature=1.0, top_k=2, top_p=0.99))
    assert set(tokens.tolist()) == {0, 1}


def test_sampling_follows_the_softmax_and_temperature_changes_it():
    for temperature in (0.5, 1.0, 2.0):
        expected = (LOGITS / temperature).softmax(-1)[0]
        counts = torch.bincount(draws(SamplingParams(temperature=temperature), n=20000), minlength=8)
        assert torch.allclose(counts / 20000, expected, atol=0.015), temperature
    cold = (draws(SamplingParams(temperature=0.5)) == 0).float().mean()
    hot = (draws(SamplingParams(temperature=2.0)) == 0).float().mean()
    assert cold > 0.8 > 0.45 > hot


def test_edge_values():
    greedy = LOGITS.argmax(-1)
    # temperature 0 and temperatures too small to divide by are greedy, whatever the filters
    for params in (SamplingParams(), SamplingParams(temperature=1e-9, top_k=5), SamplingParams(top_p=0.5)):
        assert torch.equal(next_tokens(LOGITS, params, EMPTY), greedy)
    # top_k of 0 or beyond the vocabulary and top_p of 1 filter nothing
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS) and torch.equal(top_k_filter(LOGITS, 100), LOGITS)
    assert torch.equal(top_p_filter(LOGITS, 1.0), LOGITS)
    assert set(draws(SamplingParams(temperature=1.0, top_k=100, top_p=1.0), n=20000).tolist()) == set(range(8))
    # a very hot temperature is close to uniform, and ties under top-k keep every tied token
    counts = torch.bincount(draws(SamplingParams(temperature=1e4), n=8000), minlength=8)
    assert counts.min() > 800
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(top_k_filter(tied, 2)).sum() == 3


def test_repetition_penalty_changes_what_is_sampled():
    seen = torch.tensor([[0]])
    tokens = next_tokens(LOGITS, SamplingParams(repetition_penalty=100.0), seen)
    assert tokens.item() == 1  # the best token was seen: its logit 4 became 0.04


def test_out_of_range_options_are_refused():
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(UserError):
            SamplingParams(**bad)
