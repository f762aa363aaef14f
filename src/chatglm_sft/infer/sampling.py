"""Choosing the next token: pure functions over a [B, V] logits tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatglm_sft.options import check, option

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the CLI checks generation options (SamplingParams) before loading anything.

SEED_MAX = 2**63 - 1

# Below this temperature, logits / temperature overflow (or the softmax underflows to one-hot) in float32; sampling
# there is greedy in the limit, so it is done greedily.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Also the generation options of predict, chat, eval, serve and webui:
    the ranges below are checked on construction (`OptionError` names the option), so the server reuses them."""

    max_new_tokens: int = option(256, ge=1)
    """Upper bound on generated tokens per prompt."""
    temperature: float = option(0.0, ge=0)
    """0 means greedy (reproducible); otherwise logits are divided by it before sampling."""
    top_p: float = option(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = option(0, ge=0)
    """Keep only the k most likely tokens (0: no limit)."""
    repetition_penalty: float = option(1.0, gt=0)
    """CTRL-style penalty (>1 discourages tokens already in prompt or output)."""
    stop: tuple[str, ...] = option(default_factory=tuple, repeat=True, metavar="TEXT")
    """Strings that end generation; the text is cut before them (repeatable)."""
    seed: int | None = option(None, ge=0, le=SEED_MAX)
    """Seed for sampling; none draws from torch's global generator."""

    def __post_init__(self):
        check(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of already seen token ids (`seen`: [B, T], -1 ignored)."""
    import torch

    if penalty == 1.0 or seen.numel() == 0:
        return logits
    counts = torch.zeros_like(logits, dtype=torch.int32)
    counts.scatter_add_(1, seen.clamp(min=0), (seen >= 0).int())
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    import torch

    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    import torch

    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the tokens before it already reach p (the most likely token always stays)
    drop = (cumulative - sorted_logits.softmax(-1)) >= p
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def most_likely(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token ([B] int64): the first largest logit, a NaN counting as largest (as
    `torch.argmax`). On the CPU through NumPy, whose argmax is vectorised: PyTorch's CPU argmax took ~80 us for one
    65,024-wide float32 row on a 2-core AVX2 host (330 us in bf16), NumPy's ~9 us, and greedy decoding does one a
    token."""
    if logits.device.type != "cpu":
        return logits.argmax(-1)
    import numpy as np
    import torch

    return torch.from_numpy(np.argmax(logits.float().numpy(), axis=-1))


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token per row ([B]) for float logits [B, V]."""
    import torch
    import torch.nn.functional as F

    scores = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return most_likely(scores)
    probs = top_p_filter(top_k_filter(scores / params.temperature, params.top_k), params.top_p).softmax(-1)
    # A row whose tempered logits overflowed has no valid distribution: take its most likely token (the greedy
    # limit) rather than let `multinomial` fail.
    broken = ~torch.isfinite(probs).all(-1) | (probs.sum(-1) <= 0)
    if broken.any():
        probs = torch.where(broken[:, None], F.one_hot(scores.argmax(-1), probs.shape[-1]).to(probs), probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
