"""Our DPO, ORPO and SimPO losses and rewards against TRL's own code on the same pairs and the same tiny
GlmForCausalLM + LoRA (ChatGLM2), and ChatGLM-6B's batched log-probabilities against a direct per-row computation.

TRL's DPO is run through `DPOTrainer._compute_loss` (its concatenated forward with the fused LM head, the reference
by disabling the adapter); ORPO's odds ratio and SimPO's loss through `ORPOTrainer.odds_ratio_loss`,
`CPOTrainer.cpo_loss` and their `get_batch_logps`. The trainers are not constructed (that needs a dataset and a
tokenizer TRL can drive): each method gets a stand-in `self` with the attributes it reads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import chatglm_sft
from chatglm_sft.data.pairs import Pair, encode_pair
from chatglm_sft.train.config import load_config
from chatglm_sft.train.methods import prepare_model
from chatglm_sft.train.objectives import PairLogps, PreferenceSettings, dpo_loss, orpo_loss, simpo_loss
from chatglm_sft.train.preference import disable_dropout, pair_batch, sequence_logps

trl = pytest.importorskip("trl")

TOL = 1e-5
PAIRS = [
    Pair([{"role": "user", "content": "3+4等于多少？"}], "3+4=7，答：7", "3+4=8，答：8"),
    Pair(
        [
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好，有什么可以帮你？"},
            {"role": "user", "content": "9-5=?"},
        ],
        "9-5=4",
        "9-5=5，答：5，这是一个更长的错误回答",
    ),
    Pair([{"role": "user", "content": "Copy: the cat sat"}], "the cat sat", "the dog"),
]


def lora_model(folder, family: str, seed: int = 0):
    """The tiny model with LoRA whose B matrices are random, so the policy differs from the reference."""
    # float64: sums of hundreds of log-probabilities must agree to 1e-5, which float32 rounding alone can exceed.
    model = chatglm_sft.load_model(folder, family=family, dtype="float32").double()
    config = load_config(None, {"model": str(folder), "data": "d", "output": "o", "method": "lora"})
    model = prepare_model(model, config, chatglm_sft.families.get_family(family))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    disable_dropout(model)
    return model.eval()


def encoded_batch(folder, family: str):
    tokenizer = chatglm_sft.load_tokenizer(folder, family=family)
    pairs = [encode_pair(tokenizer, p, 256) for p in PAIRS]
    return pair_batch(pairs, tokenizer.family.pad_id)


def our_logps(model, batch, reference: bool) -> PairLogps:
    sums, counts = sequence_logps(model, batch, None)
    chosen, rejected = sums.chunk(2)
    lp = PairLogps(chosen, rejected, *counts.chunk(2))
    if reference:
        with torch.no_grad(), model.disable_adapter():
            lp.ref_chosen, lp.ref_rejected = sequence_logps(model, batch, None)[0].chunk(2)
    return lp


@pytest.fixture(scope="module")
def glm(tiny_checkpoint):
    folder = tiny_checkpoint("chatglm2-6b")
    return lora_model(folder, "chatglm2-6b"), encoded_batch(folder, "chatglm2-6b")


def trl_dpo(model, batch, beta: float, sft_weight: float = 0.0):
    """DPOTrainer._compute_loss on our batch (TRL's completion mask = our reply labels); with `sft_weight` α, TRL's
    RPO: loss types sigmoid + sft weighted 1 and α."""
    from accelerate import Accelerator
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    shell = DPOTrainer.__new__(DPOTrainer)
    shell.__dict__.update(
        model=model,
        ref_model=None,
        accelerator=Accelerator(cpu=True),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid", "sft"] if sft_weight else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight else [1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    loss = shell._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in shell._metrics["eval"].items()}


def test_dpo_matches_trl(glm):
    model, batch = glm
    settings = PreferenceSettings(beta=0.1)
    ours = dpo_loss(our_logps(model, batch, reference=True), settings)
    loss, metrics = trl_dpo(model, batch, settings.beta)
    assert abs(ours.per_pair.mean().item() - loss.item()) <= TOL
    assert abs(ours.per_pair.mean().item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    assert abs(ours.rewards_chosen.mean().item() - metrics["rewards/chosen"]) <= TOL
    assert abs(ours.rewards_rejected.mean().item() - metrics["rewards/rejected"]) <= TOL
    margins = ours.rewards_chosen - ours.rewards_rejected
    assert abs(margins.mean().item() - metrics["rewards/margins"]) <= TOL
    assert abs((margins > 0).float().mean().item() - metrics["rewards/accuracies"]) <= TOL
    # Summed log-probabilities are in the hundreds and TRL reports them from float32: equal to 1e-5 relative.
    assert ours.logps_chosen.mean().item() == pytest.approx(metrics["logps/chosen"], rel=TOL)
    assert ours.logps_rejected.mean().item() == pytest.approx(metrics["logps/rejected"], rel=TOL)


def test_dpo_with_chosen_nll_matches_trl_rpo(glm):
    """`--rpo-alpha`: the DPO loss plus α times the chosen replies' NLL per token, as TRL's sigmoid + sft."""
    model, batch = glm
    settings = PreferenceSettings(beta=0.1, rpo_alpha=0.7)
    lp = our_logps(model, batch, reference=True)
    ours = dpo_loss(lp, settings)
    total = ours.per_pair.mean() + ours.token_sum / lp.chosen_tokens.sum()
    loss, _ = trl_dpo(model, batch, settings.beta, sft_weight=settings.rpo_alpha)
    assert abs(total.item() - loss.item()) <= TOL
    assert total.item() - ours.per_pair.mean().item() > 0.1  # the NLL term is there
    assert dpo_loss(lp, PreferenceSettings(beta=0.1)).token_sum is None  # and absent by default


def _trl_batch_logps(model, batch, average: bool):
    from trl.experimental.cpo import CPOTrainer

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average).chunk(2), logits


def test_orpo_matches_trl(glm):
    from trl.experimental.orpo import ORPOTrainer

    model, batch = glm
    settings = PreferenceSettings(orpo_lambda=0.2)
    with torch.no_grad():
        ours = orpo_loss(our_logps(model, batch, reference=False), settings)
    (chosen, rejected), logits = _trl_batch_logps(model, batch, average=True)
    shell = SimpleNamespace(beta=settings.orpo_lambda, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, rewards_chosen, rewards_rejected, _, _ = ORPOTrainer.odds_ratio_loss(shell, chosen, rejected)
    # The NLL of the chosen replies over their reply tokens (the ORPO paper's and our SFT's; TRL adds the prompt).
    half = batch["labels"].shape[0] // 2
    nll = torch.nn.functional.cross_entropy(
        logits[:half, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:half, 1:].reshape(-1), ignore_index=-100
    )
    chosen_tokens = (batch["labels"][:half, 1:] != -100).sum()
    ours_total = ours.per_pair.mean() + ours.token_sum / chosen_tokens
    # TRL's odds ratio is computed in float32
    assert torch.allclose(ours.per_pair.float(), -ratio_losses, atol=TOL)
    assert abs(ours_total.item() - (nll - ratio_losses.mean()).item()) <= TOL
    assert torch.allclose(ours.rewards_chosen.float(), rewards_chosen, atol=TOL)
    assert torch.allclose(ours.rewards_rejected.float(), rewards_rejected, atol=TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo(glm, smoothing):
    from trl.experimental.cpo import CPOTrainer

    model, batch = glm
    settings = PreferenceSettings(beta=2.0, simpo_gamma=0.5, label_smoothing=smoothing)
    with torch.no_grad():
        ours = simpo_loss(our_logps(model, batch, reference=False), settings)
    (chosen, rejected), _ = _trl_batch_logps(model, batch, average=True)
    shell = SimpleNamespace(
        alpha=0.0,
        beta=settings.beta,
        simpo_gamma=settings.simpo_gamma,
        label_smoothing=smoothing,
        loss_type="simpo",
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    losses, rewards_chosen, rewards_rejected = CPOTrainer.cpo_loss(shell, chosen, rejected)
    assert torch.allclose(ours.per_pair, losses, atol=TOL)
    assert torch.allclose(ours.rewards_chosen, rewards_chosen, atol=TOL)
    assert torch.allclose(ours.rewards_rejected, rewards_rejected, atol=TOL)


def test_dpo_label_smoothing_is_trl_conservative_sigmoid(glm):
    """TRL's conservative sigmoid (CPOTrainer's `sigmoid` loss on the log-ratio difference) for ε > 0."""
    from trl.experimental.cpo import CPOTrainer

    model, batch = glm
    settings = PreferenceSettings(beta=0.1, label_smoothing=0.2)
    with torch.no_grad():
        lp = our_logps(model, batch, reference=True)
    ours = dpo_loss(lp, settings)
    shell = SimpleNamespace(
        alpha=0.0, beta=0.1, label_smoothing=0.2, loss_type="sigmoid", accelerator=SimpleNamespace(device="cpu")
    )
    losses, _, _ = CPOTrainer.cpo_loss(shell, lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected)
    assert torch.allclose(ours.per_pair, losses, atol=TOL)


def test_chatglm6b_batched_logps_equal_direct_per_row(tiny_checkpoint):
    """ChatGLM-6B (2-D positions, prefix-LM mask) left-padded in one 2·B batch gives each row's log-probabilities as
    the row alone does, and the DPO loss follows from them."""
    folder = tiny_checkpoint("chatglm-6b")
    model = lora_model(folder, "chatglm-6b")
    batch = encoded_batch(folder, "chatglm-6b")
    with torch.no_grad():
        lp = our_logps(model, batch, reference=True)
        direct, direct_ref = [], []
        for row in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][row].bool()
            ids, labels = batch["input_ids"][row, real][None], batch["labels"][row, real]
            for target, context in ((direct, torch.no_grad()), (direct_ref, model.disable_adapter())):
                with context:
                    logits = model(input_ids=ids).logits[0]
                token_logps = torch.log_softmax(logits[:-1], -1).gather(1, labels[1:].clamp(min=0)[:, None])[:, 0]
                target.append(token_logps[labels[1:] != -100].sum())
    direct, direct_ref = torch.stack(direct), torch.stack(direct_ref)
    assert torch.allclose(torch.cat([lp.chosen, lp.rejected]), direct, atol=TOL)
    assert torch.allclose(torch.cat([lp.ref_chosen, lp.ref_rejected]), direct_ref, atol=TOL)
    settings = PreferenceSettings(beta=0.1)
    half = len(PAIRS)
    delta = (direct[:half] - direct_ref[:half]) - (direct[half:] - direct_ref[half:])
    expected = -torch.nn.functional.logsigmoid(settings.beta * delta)
    assert torch.allclose(dpo_loss(lp, settings).per_pair, expected, atol=TOL)
