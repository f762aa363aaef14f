"""DPO after SFT on a tiny model: does preference tuning raise held-out accuracy on generated arithmetic problems?

The demo's pipeline (a small ChatGLM2-architecture model and tokenizer made on the spot, brief base training, LoRA
SFT), with SFT replies from a source of mixed quality (for 30% of the arithmetic facts, 60% of the replies are off by
one), then DPO from the SFT adapter (`--ref-adapter`: the reference is the SFT model) on on-policy pairs: the SFT
model answers 1,000 training problems greedily; chosen = the correct worked answer, rejected = its own wrong reply
(and, for balance, the same confusions the other way round; see `on_policy_pairs`). Held-out accuracy (greedy, the
Math23K scorer) before and after. Results and the runs around them: docs/preference.md.

    python benchmarks/dpo_arithmetic.py OUTPUT_DIR [--sft-steps 400] [--dpo-steps 40] [--learning-rate 2e-4]
        [--beta 0.1] [--rpo-alpha 0] [--label-smoothing 0] [--rejected own|sampled|shifted|operator] [--every-problem]
        [--reply-format equation|demo] [--noise-kind fact|operation] [--noisy-facts 0.3] [--noise 0.6]
        [--imperfect-chosen 0] [--reuse]

With `--noise-kind operation` the SFT source misreads a wording instead (problems where someone gives things away
are answered as additions 60% of the time): the SFT model knows both operations and picks the wrong one for those
questions, and DPO's pairs (its own added replies rejected) tell it which to pick, where with wrong facts they must
change arithmetic the tiny model shares across facts. The run in docs/preference.md:

    python benchmarks/dpo_arithmetic.py OUTPUT_DIR --noise-kind operation --sft-steps 800 --learning-rate 1e-4

`--rpo-alpha 1 --beta 1e-5` is the control: the NLL of the chosen replies with the preference term made negligible.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from chatglm_sft.demo.problems import make_problems
from chatglm_sft.demo.run import (
    BASE_TRAINING,
    LORA_SFT,
    MAX_NUMBER,
    base_checkpoint,
    base_corpus,
    math_accuracy,
    questions,
    tokenizer_texts,
)
from chatglm_sft.demo.tokenizer import train_tokenizer
from chatglm_sft.infer.predict import write_jsonl
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.train.loop import train_with

REPLY_FORMATS = {"equation": "{lhs}={value}", "demo": "{lhs}={value}，答：{value}"}
"""How a reply states its result. ``demo`` is the demo's worked answer, which states it twice: a wrong reply then
differs from the right one in two places, and DPO learns to make the second copy unlikely (it stops copying the
result into ``答：``) instead of changing the result. ``equation`` states it once, so the two replies of a pair
differ at one token and DPO's term there is the logit of the right result minus the wrong one's."""


def with_result(problem: dict, value: int, reply_format: str) -> str:
    """The problem's working with `value` as its result."""
    return REPLY_FORMATS[reply_format].format(lhs=problem["solution"].split("=")[0], value=value)


def solution(problem: dict, reply_format: str) -> str:
    """The correct reply."""
    return with_result(problem, problem["answer"], reply_format)


def shifted(problem: dict, rng: random.Random, reply_format: str) -> str:
    """The problem's working with a result off by 1 to 3."""
    return with_result(problem, problem["answer"] + rng.choice([-3, -2, -1, 1, 2, 3]), reply_format)


def swapped(lhs: str) -> tuple[str, int]:
    """`lhs` ("5-3") with the other operator, and what that computes: ("5+3", 8)."""
    a, op, b = lhs.partition("-") if "-" in lhs else lhs.partition("+")
    return (f"{a}+{b}", int(a) + int(b)) if op == "-" else (f"{a}-{b}", int(a) - int(b))


def other_operation(problem: dict, reply_format: str) -> str:
    """The working done with the other operation: a subtraction added (5-3 answered 5+3=8), an addition subtracted
    (5+3 answered 5-3=2)."""
    lhs, value = swapped(problem["solution"].split("=")[0])
    return REPLY_FORMATS[reply_format].format(lhs=lhs, value=value)


def other_operator(problem: dict, reply_format: str) -> str:
    """The working with the other operator and the problem's own result (5-3 answered 5+3=2): it differs from the
    right reply at the operator alone, so a pair of the two says which operation and nothing about any sum."""
    lhs, _ = swapped(problem["solution"].split("=")[0])
    return REPLY_FORMATS[reply_format].format(lhs=lhs, value=problem["answer"])


MISREAD = "送给同学"
"""The wording (of one of the demo's two subtraction templates: "gives N to a classmate") that the source of
`operation_noisy_solutions` misreads as receiving."""


def operation_noisy_solutions(problems: list[dict], rate: float, seed: int, reply_format: str) -> list[str]:
    """SFT replies from a source that misreads one wording: a word problem saying `MISREAD` is answered as an
    addition with probability `rate` (5-3 answered 5+3=8); the others are right. The mistake is one rule, not a
    fact, and subtraction is still taught by the other template, so the SFT model knows both operations and picks
    the wrong one for these questions."""
    rng = random.Random(seed)
    return [
        other_operation(p, reply_format)
        if rng.random() < rate and MISREAD in p["question"]
        else solution(p, reply_format)
        for p in problems
    ]


def noisy_solutions(problems: list[dict], share: float, rate: float, seed: int, reply_format: str) -> list[str]:
    """SFT replies from a source of mixed quality: for a `share` of the arithmetic facts (4+5, 3-2, ...) a reply is
    wrong with probability `rate`, always off the same way for a fact (4+5=10, say); the others are right."""
    rng = random.Random(seed)
    facts = sorted({p["solution"].split("=")[0] for p in problems})
    offsets = {fact: rng.choice([-1, 1]) for fact in rng.sample(facts, round(share * len(facts)))}
    replies = []
    for p in problems:
        offset = offsets.get(p["solution"].split("=")[0])
        value = p["answer"] + offset if offset and rng.random() < rate else p["answer"]
        replies.append(with_result(p, value, reply_format))
    return replies


def on_policy_pairs(
    problems: list[dict],
    records: Path,
    rng: random.Random,
    reply_format: str,
    filler: Callable[[dict], str] | None = None,
    reverse: bool = True,
) -> tuple[list[dict], int]:
    """Pairs from the SFT model's greedy answers to the training problems (on-policy), chosen = the correct working:

    * where it erred, rejected = its own wrong reply (it answers 8 where 9 is right, say);
    * with `reverse`, where it was right with an answer it wrongly gives elsewhere, rejected = the same confusion the
      other way round (9 where 8 is right): pairs of its mistakes alone teach a blanket "say a larger digit" when the
      mistakes are confused facts (with a misread operation they are not: 5+3=8 is no confusion of 8 with 2);
    * with a `filler`, every other problem too, rejected = `filler(problem)` (its working with a result off by 1 to
      3, say, or with the other operation), so that what it already does right is held in place while its mistakes
      are corrected.

    The other problems make no pair. Returns the pairs and how many rejected replies are the model's own."""
    answers = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()]
    own = [
        None if a["correct"] or a["response"].strip() in ("", solution(p, reply_format)) else a["response"].strip()
        for p, a in zip(problems, answers, strict=True)
    ]
    should_be: dict[float, set[int]] = {}  # an answer the model gives wrongly -> the answers it should have given
    for problem, answer, mistake in zip(problems, answers, own, strict=True):
        if mistake and answer["pred_answer"] is not None:
            should_be.setdefault(answer["pred_answer"], set()).add(problem["answer"])
    pairs = []
    for problem, mistake in zip(problems, own, strict=True):
        others = sorted(should_be.get(problem["answer"], set()) - {problem["answer"]}) if reverse else []
        rejected = mistake or (with_result(problem, rng.choice(others), reply_format) if others else None)
        if rejected is None and filler is not None:
            rejected = filler(problem)
        if rejected:
            chosen = solution(problem, reply_format)
            pairs.append({"instruction": problem["question"], "chosen": chosen, "rejected": rejected})
    return pairs, sum(m is not None for m in own)


def imperfect_chosen(records: list[dict], problems: list[dict], share: float, seed: int, reply_format: str) -> int:
    """Make a `share` of the pairs' chosen replies right in method but wrong in result (5-3=3 preferred to 5+3=8),
    in place, as when raters judge which reply took the right approach: a preference still says which is better,
    while SFT on the chosen replies would also learn their wrong results. Returns how many were changed."""
    rng, answers = random.Random(seed), {p["question"]: p for p in problems}
    changed = 0
    for record in records:
        if rng.random() < share:
            problem = answers[record["instruction"]]
            candidates = [with_result(problem, problem["answer"] + d, reply_format) for d in (-1, 1)]
            record["chosen"] = rng.choice([c for c in candidates if c != record["rejected"]])  # replies must differ
            changed += 1
    return changed


def is_confusion(problem: dict, reply: str, reply_format: str) -> bool:
    """Whether `reply` is the problem's working with a wrong integer result."""
    value = reply.rpartition("=")[2]
    if not value.lstrip("-").isdigit() or int(value) == problem["answer"]:
        return False
    return reply == with_result(problem, int(value), reply_format)


def sampled_pairs(problems: list[dict], rounds: list[Path], reply_format: str) -> tuple[list[dict], int]:
    """Pairs from replies the SFT model samples (on-policy, as iterative RPO makes them): for every problem where
    some of its replies in `rounds` (per-record results of `math_accuracy`) give the right working with a wrong
    result, chosen = the correct working and rejected = the most frequent of those (malformed samples are left out:
    they are easy to tell apart and say nothing about the arithmetic). Sampling finds the confusions the model
    holds beside a right greedy answer too (3-2=2 where it says 3-2=1), so a pair holds those facts in place instead
    of only mending the ones it gets wrong. Returns the pairs and how many problems had a wrong greedy or sampled
    reply."""
    answers = [[json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] for path in rounds]
    pairs = []
    for i, problem in enumerate(problems):
        replies = [round_[i]["response"].strip() for round_ in answers if not round_[i]["correct"]]
        wrong = [reply for reply in replies if is_confusion(problem, reply, reply_format)]
        if wrong:
            rejected = Counter(wrong).most_common(1)[0][0]
            pairs.append({"instruction": problem["question"], "chosen": solution(problem, reply_format),
                          "rejected": rejected})  # fmt: skip
    return pairs, len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--rpo-alpha", type=float, default=0.0, help="weight of the chosen reply's NLL (0: plain DPO)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="DPO's label smoothing (cDPO)")
    kinds = "fact: some facts' SFT replies are off by one (noisy_solutions); operation: the replies to one "
    kinds += "wording of subtraction add instead (operation_noisy_solutions)"
    parser.add_argument("--noise-kind", choices=["fact", "operation"], default="fact", help=kinds)
    parser.add_argument("--noisy-facts", type=float, default=0.3, help="share of the facts with wrong SFT replies")
    parser.add_argument(
        "--noise", type=float, default=0.6, help="how often a noisy fact's (misread problem's) reply is wrong"
    )
    parser.add_argument("--rejected", choices=["own", "sampled", "shifted", "operator"], default="own",
                        help="own: on-policy pairs from the SFT model's greedy mistakes (see on_policy_pairs); "
                        "sampled: from its greedy and sampled replies (see sampled_pairs); shifted: every problem, "
                        "rejected = the correct working with a result off by 1-3; operator: every problem, "
                        "rejected = the other operator with the right result (see other_operator)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=8, help="with --rejected sampled: replies sampled per problem")
    parser.add_argument("--reply-format", choices=sorted(REPLY_FORMATS), default="equation",
                        help="how SFT replies and pairs state the result (see REPLY_FORMATS)")  # fmt: skip
    every = "with --rejected own: a pair for every training problem (rejected: off by 1-3, or with --noise-kind "
    every += "operation the other operation; see on_policy_pairs)"
    parser.add_argument("--every-problem", action="store_true", help=every)
    parser.add_argument("--pairs", type=int, default=1000, help="training problems to make pairs of")
    imperfect = "share of the chosen replies given a result off by one, the method kept (see imperfect_chosen)"
    parser.add_argument("--imperfect-chosen", type=float, default=0.0, help=imperfect)
    keep = "keep the base model, SFT adapter and evaluations already in OUTPUT (to tune DPO)"
    parser.add_argument("--reuse", action="store_true", help=keep)
    args = parser.parse_args()
    out, seed, start = Path(args.output), args.seed, time.perf_counter()
    fmt = args.reply_format

    def stage(text: str, done: Path | None = None) -> bool:
        """Print the stage; True when it is to run (not reused)."""
        reused = args.reuse and done is not None and done.exists()
        print(f"[{time.perf_counter() - start:6.1f}s] {text}{' (reused)' if reused else ''}", flush=True)
        return not reused

    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = make_problems(3000, seed, MAX_NUMBER), make_problems(200, seed + 1, MAX_NUMBER)
    equations = make_problems(3000, seed + 2, MAX_NUMBER)
    corpus = write_jsonl(base_corpus(train_set, equations), out / "corpus.jsonl")
    if args.noise_kind == "operation":
        replies = operation_noisy_solutions(train_set, args.noise, seed + 3, fmt)
    else:
        replies = noisy_solutions(train_set, args.noisy_facts, args.noise, seed + 3, fmt)
    sft_rows = [{"instruction": p["question"], "output": r} for p, r in zip(train_set, replies, strict=True)]
    sft = write_jsonl(sft_rows, out / "sft.jsonl")
    test = write_jsonl(questions(test_set), out / "test.jsonl")
    pair_problems = train_set[: args.pairs]
    probe = write_jsonl(questions(pair_problems), out / "probe.jsonl")
    init, base, lora, dpo = out / "base-init", out / "base", out / "sft", out / "dpo"
    common = {"precision": "fp32", "seed": seed}
    if stage("base training", base / "config.json"):
        train_tokenizer(tokenizer_texts(train_set), init)
        base_checkpoint(init, seed)
        train_with(model=init, data=corpus, output=base, max_steps=args.base_steps, **BASE_TRAINING, **common)
    if stage("LoRA SFT", lora / "adapter_config.json"):
        train_with(model=base, data=sft, output=lora, max_steps=args.sft_steps, **LORA_SFT, **common)
    if stage("evaluating SFT", out / "eval-sft.json"):
        math_accuracy(base, lora, test, out / "eval-sft.json")
    sft_accuracy = json.loads((out / "eval-sft.json").read_text())["accuracy"]
    print(f"SFT accuracy: {sft_accuracy:.3f}", flush=True)
    rng, own = random.Random(seed), 0
    on_policy = args.rejected in ("own", "sampled")
    if on_policy and stage(f"the SFT model answers {len(pair_problems)} training problems", out / "probe-sft.json"):
        math_accuracy(base, lora, probe, out / "probe-sft.json")
    if args.rejected == "own":
        answers, by_fact = out / "probe-sft.records.jsonl", args.noise_kind == "fact"
        filler = (lambda p: shifted(p, rng, fmt)) if by_fact else (lambda p: other_operation(p, fmt))
        records, own = on_policy_pairs(
            pair_problems, answers, rng, fmt, filler if args.every_problem else None, reverse=by_fact
        )
    elif args.rejected == "sampled":
        rounds = [out / "probe-sft.records.jsonl"]
        for k in range(args.samples):
            result = out / f"probe-sample-{k}.json"
            if stage(f"the SFT model samples its answers, round {k + 1} of {args.samples}", result):
                params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed * 1000 + k)
                math_accuracy(base, lora, probe, result, params)
            rounds.append(result.with_suffix(".records.jsonl"))
        records, own = sampled_pairs(pair_problems, rounds, fmt)
    else:
        wrong = (lambda p: shifted(p, rng, fmt)) if args.rejected == "shifted" else (lambda p: other_operator(p, fmt))
        records = [
            {"instruction": p["question"], "chosen": solution(p, fmt), "rejected": wrong(p)} for p in pair_problems
        ]
    imperfect = imperfect_chosen(records, pair_problems, args.imperfect_chosen, seed + 4, fmt)
    pairs = write_jsonl(records, out / "pairs.jsonl")
    stage("DPO from the SFT adapter (reference: the SFT model)")
    train_with(model=base, data=pairs, output=dpo, objective="dpo", method="lora", ref_adapter=lora,
               beta=args.beta, rpo_alpha=args.rpo_alpha, label_smoothing=args.label_smoothing,
               max_steps=args.dpo_steps, batch_size=16, lora_dropout=0.0,
               learning_rate=args.learning_rate, warmup_steps=10, logging_steps=1, **common)  # fmt: skip
    stage("evaluating DPO")
    dpo_accuracy = math_accuracy(base, dpo, test, out / "eval-dpo.json")
    log = [json.loads(line) for line in (dpo / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    summary = {
        "sft_accuracy": sft_accuracy,
        "dpo_accuracy": dpo_accuracy,
        "delta": round(dpo_accuracy - sft_accuracy, 4),
        "pairs": len(records),
        "rejected_from_the_sft_model": own,
        "imperfect_chosen": imperfect,
        "dpo_first_loss": steps[0]["loss"],
        "dpo_last_loss": steps[-1]["loss"],
        "dpo_last_margin": steps[-1]["rewards/margins"],
        "dpo_last_reward_accuracy": steps[-1]["rewards/accuracies"],
        "settings": vars(args),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
