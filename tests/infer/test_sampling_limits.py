"""Sampling at the edges of the allowed ranges: a tiny temperature behaves like greedy instead of failing."""

from __future__ import annotations

import torch

from chatglm_sft.infer.sampling import SamplingParams, next_tokens


def test_tiny_temperatures_behave_like_greedy():
    logits = torch.tensor([[3.0, 90.0, -5.0, 89.9], [1e4, -1e4, 0.0, 5.0]])
    seen = torch.empty(2, 0, dtype=torch.long)
    for temperature in (1e-40, 1e-30, 1e-12, 1e-6, 1e-4):
        params = SamplingParams(temperature=temperature, top_p=0.5, top_k=3, seed=1)
        generator = torch.Generator().manual_seed(0)
        assert next_tokens(logits, params, seen, generator).tolist() == [1, 0], temperature
    overflowing = torch.tensor([[1e35, 0.0, 2e35]])  # / 1e-4 overflows float32: the greedy limit, not an error
    assert next_tokens(overflowing, SamplingParams(temperature=1e-4), seen[:1]).tolist() == [2]


def test_top_p_at_its_smallest_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    params = SamplingParams(temperature=1.0, top_p=1e-9)
    draws = {next_tokens(logits, params, torch.empty(1, 0, dtype=torch.long)).item() for _ in range(20)}
    assert draws == {1}
