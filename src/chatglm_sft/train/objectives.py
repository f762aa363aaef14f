"""Training objectives as data: what each one learns from, whether it needs a reference model, and its loss.

Preference losses follow TRL's definitions (the tests check them against TRL to 1e-5):

* ``dpo``: DPOTrainer's sigmoid loss on log-probabilities summed over the reply tokens, relative to the reference;
  with ``--label-smoothing`` ε, the conservative form -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ) (TRL's ``robust`` is the
  unbiased variant). Rewards are β·(log π - log π_ref). With ``--rpo-alpha`` α, plus α times the NLL of the chosen
  reply per token (TRL's ``rpo_alpha``, Pang et al. 2024; LLaMA-Factory's ``pref_ftx``): it keeps the chosen reply
  likely where DPO alone lowers both replies.
* ``orpo``: ORPOTrainer's odds-ratio term on length-averaged log-probabilities, weighted by λ, plus the NLL of the
  chosen reply (over reply tokens, as the ORPO paper and our SFT; TRL also counts the prompt's tokens). Rewards are
  λ·mean log π.
* ``simpo``: CPOTrainer with ``loss_type="simpo"`` (and no NLL term): -logσ(β·(mean log π_c - mean log π_r) - γ),
  label smoothing as in DPO. Rewards are β·mean log π.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per pair (shape (B,)): summed reply log-probabilities and reply token counts of the policy, and of the
    reference when the objective has one."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass
class PairLoss:
    per_pair: torch.Tensor
    """(B,) loss terms averaged over all pairs of a step."""
    token_sum: torch.Tensor | None
    """A summed per-token term (ORPO's NLL) averaged over all chosen reply tokens of a step, or None."""
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    logps_chosen: torch.Tensor
    """The log-probabilities the objective works with (summed for DPO, averaged for ORPO and SimPO), for the log."""
    logps_rejected: torch.Tensor


@dataclass(frozen=True)
class PreferenceSettings:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    rpo_alpha: float = 0.0

    @classmethod
    def of(cls, config) -> PreferenceSettings:
        """The settings of a `TrainConfig`; β defaults to the objective's own."""
        beta = OBJECTIVES[config.objective].beta if config.beta is None else config.beta
        return cls(beta, config.label_smoothing, config.simpo_gamma, config.orpo_lambda, config.rpo_alpha)


def _smoothed_sigmoid(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - epsilon) - F.logsigmoid(-logits) * epsilon


def dpo_loss(lp: PairLogps, s: PreferenceSettings) -> PairLoss:
    chosen_ratio = lp.chosen - lp.ref_chosen
    rejected_ratio = lp.rejected - lp.ref_rejected
    losses = _smoothed_sigmoid(s.beta * (chosen_ratio - rejected_ratio), s.label_smoothing)
    nll_sum = -s.rpo_alpha * lp.chosen.sum() if s.rpo_alpha else None
    return PairLoss(
        losses, nll_sum, s.beta * chosen_ratio.detach(), s.beta * rejected_ratio.detach(), lp.chosen, lp.rejected
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(lp: PairLogps, s: PreferenceSettings) -> PairLoss:
    chosen = lp.chosen / lp.chosen_tokens.clamp(min=1)
    rejected = lp.rejected / lp.rejected_tokens.clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -s.orpo_lambda * F.logsigmoid(log_odds)
    nll_sum = -lp.chosen.sum()
    return PairLoss(
        losses, nll_sum, s.orpo_lambda * chosen.detach(), s.orpo_lambda * rejected.detach(), chosen, rejected
    )


def simpo_loss(lp: PairLogps, s: PreferenceSettings) -> PairLoss:
    chosen = lp.chosen / lp.chosen_tokens.clamp(min=1)
    rejected = lp.rejected / lp.rejected_tokens.clamp(min=1)
    losses = _smoothed_sigmoid(s.beta * (chosen - rejected) - s.simpo_gamma, s.label_smoothing)
    return PairLoss(losses, None, s.beta * chosen.detach(), s.beta * rejected.detach(), chosen, rejected)


@dataclass(frozen=True)
class Objective:
    """A training objective as data."""

    name: str
    data: str
    """What a training record must be: `conversations` (SFT) or `pairs` (a prompt with chosen and rejected)."""
    reference: bool
    """Whether the loss compares with a reference model's log-probabilities."""
    loss: Callable[[PairLogps, PreferenceSettings], PairLoss] | None
    """The loss over a batch of pairs (None: the loop's own answer-token cross-entropy)."""
    beta: float | None = None
    """The default β of a loss that has one (`--beta` overrides it)."""


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", "conversations", reference=False, loss=None),
        Objective("dpo", "pairs", reference=True, loss=dpo_loss, beta=0.1),
        Objective("orpo", "pairs", reference=False, loss=orpo_loss),
        # SimPO's rewards are per-token averages, which differ far less than DPO's sums: its authors train with
        # β 2-2.5 (torchtune's default 2.0); DPO's 0.1 would leave γ = 0.5 out of reach.
        Objective("simpo", "pairs", reference=False, loss=simpo_loss, beta=2.0),
    )
}
"""Every `--objective`."""
