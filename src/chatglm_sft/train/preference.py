"""Preference training (dpo, orpo, simpo): pairs in, the objective's loss out, on the SFT loop's machinery.

A micro-batch of B pairs is one forward pass over 2·B rows (the B chosen conversations, then the B rejected ones),
left-padded like SFT batches so every architecture derives its own positions (ChatGLM-6B's 2-D ones included) from
the ids and the padding mask. Log-probabilities are summed over the reply tokens only (the labels of the one
conversation encoder: the reply and its end token). A step's loss is the mean over all its pairs (and, for ORPO's
NLL, over all chosen reply tokens) on all processes, as if the step were one batch. Packing is refused: a pair's two
rows must line up.

The reference (dpo) is the model training starts from, unless `--ref-model` names another:
* LoRA from scratch: the same model with its adapter disabled (nothing extra in memory);
* `--ref-adapter DIR` (continuing an SFT adapter), full, freeze, P-Tuning, or `--precompute-ref`: log-probabilities
  computed once before the first step (a resumed run computes them again from the same starting weights);
* `--ref-model DIR`: that model, frozen, beside the policy (or only for the precomputation).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch

from chatglm_sft.conversation import IGNORE_INDEX
from chatglm_sft.cross_entropy import cross_entropy_in_place
from chatglm_sft.data.dataset import BadRecord, cache_key, write_rejected
from chatglm_sft.data.pairs import EncodedPair, check_pairs, encode_pair
from chatglm_sft.errors import UserError
from chatglm_sft.train.batching import pad_batch
from chatglm_sft.train.loop import Trainer, _say, cached_by_rank0
from chatglm_sft.train.methods import METHODS
from chatglm_sft.train.objectives import OBJECTIVES, PairLogps, PreferenceSettings

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class PairExample:
    index: int
    """Position among all pairs read (train and eval), for precomputed reference log-probabilities."""
    pair: EncodedPair


def check_options(config) -> None:
    """Refuse option combinations that do not make sense for the objective, naming the option."""
    if config.packing:
        raise UserError(f"--packing does not apply to --objective {config.objective}: a pair's two rows must line up")
    if config.ref_adapter and not METHODS[config.method].adapter:
        raise UserError(
            f"--ref-adapter continues a LoRA adapter and needs --method lora or qlora, not {config.method}"
        )
    if config.ref_adapter and config.ref_model:
        raise UserError("--ref-adapter and --ref-model both name the reference; give one")


def encode_pairs(tokenizer, pairs: list, max_length: int) -> dict[str, list]:
    """The pairs' ids and labels by `EncodedPair` field: the columns of the tokenized-pairs cache."""
    encoded = [asdict(encode_pair(tokenizer, pair, max_length)) for pair in pairs]
    return {f.name: [e[f.name] for e in encoded] for f in fields(EncodedPair)}


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """2·B left-padded rows: the chosen conversations, then the rejected ones."""
    rows = [(p.chosen_ids, p.chosen_labels) for p in pairs] + [(p.rejected_ids, p.rejected_labels) for p in pairs]
    return pad_batch(rows, pad_id)


def sequence_logps(model, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> tuple:
    """Per row: the summed log-probability of its labelled tokens, and how many there are. Logits are computed only
    where a label follows (as in SFT's loss)."""
    labels = batch["labels"]
    target = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != IGNORE_INDEX
    device = labels.device
    autocasting = torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)
    with autocasting, float32_output_layer(model):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
        ).logits
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
    token_logps = -cross_entropy_in_place(logits, target[target != IGNORE_INDEX])  # the logits: read only here
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=device).index_add(0, rows, token_logps)
    return sums, keep.sum(dim=1)


@contextmanager
def float32_output_layer(model):
    """Inside, the output layer computes in float32 even under autocast, when its weight is float32 (a LoRA or
    P-Tuning run over a float32 base, the default, or full/freeze training).

    Preference losses compare summed log-probabilities of two nearly equal models (policy and reference, or two
    replies). bf16 logits round each token's log-probability by up to ~2^-8 of its size (~0.05 nats at -11),
    uncorrelated between the two models once the adapter moves; on a tiny ChatGLM-6B that noise was larger than
    the margins 40 DPO steps learn (~3e-3), and `rewards/accuracies` read 0.25 where float32 reads 1.0. The output
    layer is a small share of the work (logits are computed for reply tokens only); a half-precision weight (a bf16
    base, DeepSpeed's bf16 mode) is left as it is rather than copied to float32 on every step."""
    head = getattr(model, "module", model).get_output_embeddings()  # under DDP and DeepSpeed: the wrapped model
    if head is None or head.weight.dtype != torch.float32:
        yield
        return
    saved, compute = head.__dict__.get("forward"), head.forward  # (an instance `forward`: accelerate's hooks)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return compute(hidden.float())

    head.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def disable_dropout(model) -> None:
    """Policy and reference must agree before the first step (loss ln 2), as TRL's `disable_dropout`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class PreferenceTrainer(Trainer):
    """The SFT trainer with pairs for examples and a preference objective for the loss."""

    def __init__(self, config):
        check_options(config)
        self.objective = OBJECTIVES[config.objective]
        self.settings = PreferenceSettings.of(config)
        self.step_metrics: dict[str, float] = {}
        super().__init__(config)
        disable_dropout(self.model)
        self.ref_model = None
        self.ref_logps: torch.Tensor | None = None
        if self.objective.reference:
            self._set_up_reference()

    # --- data -----------------------------------------------------------------------------------------------------

    def load_examples(self):
        c, d = self.config, self.d
        report = check_pairs(c.data, self.family)
        self._refuse_or_skip(report)  # before encoding: a bad file fails at once
        good = report.good[: c.max_samples or None]
        if not good:
            self._write_rejected(report.bad)
            raise UserError(f"{c.data}: no usable pairs")
        settings = {
            "kind": "pairs",
            "max_length": c.max_length,
            "max_samples": c.max_samples,
            "on_bad_record": c.on_bad_record,
        }
        key = cache_key(c.data, c.model, self.family, settings)
        build = partial(encode_pairs, self.tokenizer, [pair for _, pair in good], c.max_length)
        columns = cached_by_rank0(d, self.out / "cache", key, build)
        encoded = [EncodedPair(*row) for row in zip(*(columns[f.name] for f in fields(EncodedPair)), strict=True)]
        # A pair cut to the same tokens would count against `rewards/accuracies` on every step. Its data is fine (it
        # is --max-length that cuts it), so it is left out, loudly, whatever --on-bad-record says, and listed with
        # any bad records.
        alike = {i for i, pair in enumerate(encoded) if pair.alike}
        cut = f"--max-length {c.max_length} cuts chosen and rejected to the same tokens (they differ later)"
        self._write_rejected(
            report.bad + [BadRecord(str(c.data), good[i][0], cut, asdict(good[i][1])) for i in sorted(alike)]
        )
        if alike:
            _say(
                d,
                f"leaving out {len(alike)} pair(s) that --max-length {c.max_length} cuts to the same tokens in chosen "
                f"and rejected (raise it to keep them); they are in {self.out / 'rejected.jsonl'}",
            )
        kept = [pair for i, pair in enumerate(encoded) if i not in alike]
        examples = [PairExample(i, pair) for i, pair in enumerate(kept)]
        if not examples:
            raise UserError(f"{c.data}: no usable pairs")
        order = list(range(len(examples)))
        random.Random(c.seed).shuffle(order)
        n_eval = int(len(examples) * (c.eval_split or 0.0))
        beta = f" (β {self.settings.beta:g})" if self.objective.beta is not None else ""
        _say(d, f"{len(examples)} pairs ({n_eval} held out), objective {c.objective}{beta}")
        return [examples[i] for i in sorted(order[n_eval:])], [examples[i] for i in sorted(order[:n_eval])]

    def _refuse_or_skip(self, report) -> None:
        """The file's bad pairs: the first as the error (--on-bad-record error), else how many are skipped."""
        if not report.bad:
            return
        if self.config.on_bad_record == "error":
            raise UserError(
                f"{report.bad[0]} ({len(report.bad)} bad pair(s) of {report.read}; run "
                "`chatglm-sft data check` for all of them, or pass --on-bad-record skip)"
            )
        rejected = self.out / "rejected.jsonl"
        _say(self.d, f"skipping {len(report.bad)} bad pair(s) of {report.read}; they are in {rejected}")

    def _write_rejected(self, bad: list[BadRecord]) -> None:
        if bad and self.d.main:
            write_rejected(bad, self.out / "rejected.jsonl")

    def example_length(self, example) -> int:
        return example.pair.length

    def step_examples(self, step: int):
        """This process's micro-batches of `step` with their weights, and the whole step's pair and chosen reply
        token counts (all processes)."""
        indices = self.step_indices(step)
        chosen_tokens = sum(_reply_tokens(self.train_set[i].pair.chosen_labels) for i in indices)
        return self.micro_batches(indices), (len(indices), chosen_tokens)

    # --- the reference --------------------------------------------------------------------------------------------

    def _set_up_reference(self) -> None:
        c = self.config
        if c.ref_model:
            import chatglm_sft

            self.ref_model = chatglm_sft.load_model(
                c.ref_model, dtype=METHODS[c.method].base_dtype(c), device=self.d.device, family=self.family.name
            )
            self.ref_model.eval().requires_grad_(False)
            described = f"the model in {c.ref_model}"
        elif c.ref_adapter:
            described = f"the base model with the adapter {c.ref_adapter} (the model training starts from)"
        elif METHODS[c.method].adapter:
            described = "the base model (the adapter disabled)"
        else:
            described = "the model training starts from"
        adapter_off = METHODS[c.method].adapter and not c.ref_adapter
        live = (self.ref_model is not None or adapter_off) and not c.precompute_ref
        if live:
            _say(self.d, f"reference: {described}, computed alongside each step")
            return
        self.ref_logps = self._precompute()
        self.ref_model = None  # not needed any more
        _say(self.d, f"reference: {described}, log-probabilities computed once before training")

    @torch.no_grad()
    def _precompute(self) -> torch.Tensor:
        """(pairs, 2) reference log-probabilities of every pair, train and eval, from the model as it starts."""
        examples = sorted(self.train_set + self.eval_set, key=lambda e: e.index)
        out = torch.zeros(len(examples), 2, dtype=torch.float64)
        self.model.eval()
        for start in range(0, len(examples), self.config.batch_size):
            chunk = examples[start : start + self.config.batch_size]
            chosen, rejected = self._reference_forward(chunk)
            out[[e.index for e in chunk]] = torch.stack([chosen, rejected], dim=1).double().cpu()
        self.model.train()
        return out

    @torch.no_grad()
    def _reference_forward(self, examples: list[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(self.d.device) for k, v in pair_batch([e.pair for e in examples], self.family.pad_id).items()}
        if self.ref_model is not None:
            model, context = self.ref_model, nullcontext()
        else:
            # Without --ref-adapter the starting model of a LoRA run is its base: the adapter disabled.
            adapter_off = METHODS[self.config.method].adapter and not self.config.ref_adapter
            model = self.parallel.module
            context = self.model.disable_adapter() if adapter_off else nullcontext()
        with context:
            sums, _ = sequence_logps(model, batch, self.autocast)
        return sums.chunk(2)

    def reference_logps(self, examples: list[PairExample]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_logps is not None:
            picked = self.ref_logps[[e.index for e in examples]].to(self.d.device, torch.float32)
            return picked[:, 0], picked[:, 1]
        return self._reference_forward(examples)

    # --- the loss -------------------------------------------------------------------------------------------------

    def pair_loss(self, model, examples: list[PairExample]):
        batch = {k: v.to(self.d.device) for k, v in pair_batch([e.pair for e in examples], self.family.pad_id).items()}
        sums, counts = sequence_logps(model, batch, self.autocast)
        chosen, rejected = sums.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        logps = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)
        if self.objective.reference:
            logps.ref_chosen, logps.ref_rejected = self.reference_logps(examples)
        return self.objective.loss(logps, self.settings), int(counts.sum())

    @staticmethod
    def _metric_sums(out, weight: float) -> list[float]:
        margins = out.rewards_chosen - out.rewards_rejected
        values = (
            out.rewards_chosen,
            out.rewards_rejected,
            margins,
            (margins > 0).float(),
            out.logps_chosen.detach(),
            out.logps_rejected.detach(),
        )
        return [float(v.sum()) * weight for v in values]

    def train_step(self, step: int) -> tuple[float, int]:
        micro, (pairs, chosen_tokens) = self.step_examples(step)
        local = [0.0] * (len(METRICS) + 2)  # loss, tokens, then the metrics
        for k, (examples, weight) in enumerate(micro):
            last = k == len(micro) - 1
            with nullcontext() if last else self.parallel.accumulating():
                out, tokens = self.pair_loss(self.parallel.module, examples)
                loss = out.per_pair.sum() / pairs
                if out.token_sum is not None:
                    loss = loss + out.token_sum / max(1, chosen_tokens)
                self.parallel.backward(loss * (self.d.world * weight))
            local[0] += loss.item() * weight
            local[1] += tokens * weight
            for j, v in enumerate(self._metric_sums(out, weight)):
                local[2 + j] += v
        total = self.d.all_sum(local)
        self.step_metrics = {name: v / pairs for name, v in zip(METRICS, total[2:], strict=True)}
        return total[0], int(total[1])

    def extra_metrics(self) -> dict:
        return self.step_metrics

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if not self.eval_set:
            return None
        self.model.eval()
        per_batch = self.config.batch_size * self.d.world
        chosen_tokens = sum(_reply_tokens(e.pair.chosen_labels) for e in self.eval_set)
        local = [0.0] * (len(METRICS) + 1)
        for start in range(0, len(self.eval_set), per_batch):
            mine, weight = self._share(self.eval_set[start : start + per_batch])
            out, _ = self.pair_loss(self.model, mine)
            loss = out.per_pair.sum() / len(self.eval_set)
            if out.token_sum is not None:
                loss = loss + out.token_sum / max(1, chosen_tokens)
            local[0] += loss.item() * weight
            for j, v in enumerate(self._metric_sums(out, weight)):
                local[1 + j] += v
        self.model.train()
        total = self.d.all_sum(local)
        result = {"eval_loss": total[0]}
        result.update({f"eval_{name}": v / len(self.eval_set) for name, v in zip(METRICS, total[1:], strict=True)})
        return result

    def _log_eval(self, log) -> None:
        result = self.evaluate()
        if result is not None and all(math.isfinite(v) for v in result.values()):
            log.write({"step": self.state.step, **result})


def _reply_tokens(labels: list[int]) -> int:
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)
