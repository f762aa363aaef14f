"""Training throughput: chatglm-sft's `train` against the usual transformers Trainer + PEFT setup, in one run.

Both train LoRA on the same ChatGLM2-architecture model (random weights, real 65,024 vocabulary), on the same
examples (alpaca_zh_demo.json through the real ChatGLM2 tokenizer and chatglm-sft's conversation encoder, cutoff
1024), with the same precision, batch size and number of steps. The baseline is what LLaMA-Factory does by default:
`transformers.Trainer`, `GlmForCausalLM` with PEFT LoRA, `DataCollatorForSeq2Seq` dynamic padding, random order, no
packing, the model's own loss over the full vocabulary at every position. Each side runs in its own process (for its
peak RSS). Prints real (non-pad) tokens/s, peak RSS, achieved FLOP/s against the machine's measured matmul peak, and
a last line `ratio <ours/baseline tokens per second>`.

Two shapes: `small` (hidden 512, 4 layers, the real vocabulary: the 65k-entry output layer is ~60% of a token's
FLOPs, so computing logits only for answer tokens dominates the gain) and `6b-mix` (hidden 1024, 4 layers, FFN 6848,
token ids folded into 4,096 entries, id mod 4096, on both sides: the output layer is 4.2% of the FLOPs, as in
ChatGLM2-6B's 4.5%). With `--breakdown` (default for 6b-mix) two more runs of ours split the gain: ours without
length grouping and with logits at every position ("other": the loop itself), then with grouping ("padding
removed"), then the real thing ("logits skipped"); the three factors multiply to the ratio.

    python benchmarks/train_throughput.py [--quick] [--shape small|6b-mix] [--steps 20] [--batch-size 8]
        [--precision fp32|bf16] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAPES = {
    "small": {"hidden": 512, "layers": 4, "heads": 8, "head_dim": 64, "groups": 2, "ffn": 1376, "vocab": 65024},
    "6b-mix": {"hidden": 1024, "layers": 4, "heads": 8, "head_dim": 128, "groups": 2, "ffn": 6848, "vocab": 4096},
}
FAMILY = "chatglm2-6b"
"""Named, not detected: the 6b-mix model's 4,096-entry vocabulary is not ChatGLM2's published one."""
SIDES = ("baseline", "ours-plain", "ours-grouped", "ours")
"""The baseline, ours with neither length grouping nor answer-only logits, ours with grouping only, ours."""


def build_checkpoint(folder: Path, shape: dict) -> Path:
    """The benchmark model in THUDM's layout, with the ChatGLM2 tokenizer beside it."""
    import shutil

    from chatglm_sft.models.synthetic import chatglm2_config, random_model, write_thudm_checkpoint

    config = chatglm2_config(
        shape["hidden"],
        shape["layers"],
        shape["ffn"],
        head_dim=shape["head_dim"],
        kv_groups=shape["groups"],
        heads=shape["heads"],
    )
    config.vocab_size = shape["vocab"]
    write_thudm_checkpoint(random_model(config), folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(SHARED / "reference/models/chatglm2-6b" / name, folder / name)
    return folder


def examples(model_dir: Path, vocab: int, max_length: int = 1024) -> list[tuple[list[int], list[int]]]:
    import chatglm_sft
    from chatglm_sft.data.dataset import check_records, tokenize_records

    tokenizer = chatglm_sft.load_tokenizer(model_dir, family=FAMILY)
    report = check_records(SHARED / "data/alpaca/alpaca_zh_demo.json", family=tokenizer.family)
    tokenized = tokenize_records(tokenizer, [m for _, m in report.good], max_length)
    return fold(list(zip(tokenized.input_ids, tokenized.labels, strict=True)), vocab)


def fold(rows: list[tuple[list[int], list[int]]], vocab: int) -> list[tuple[list[int], list[int]]]:
    """Token ids mod `vocab` (labels' -100 kept): the same examples for a model with a smaller vocabulary."""
    return [([i % vocab for i in x], [y if y < 0 else y % vocab for y in ys]) for x, ys in rows]


def peak_rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def trainer_class(side: str, vocab: int):
    """chatglm-sft's `Trainer` on folded examples; for `ours-plain` / `ours-grouped`, with logits at every position."""
    import torch

    from chatglm_sft.batches import answer_cross_entropy
    from chatglm_sft.train.loop import Trainer

    class Folded(Trainer):
        def load_examples(self):
            return tuple(fold(part, vocab) for part in super().load_examples())

    class AllLogits(Folded):
        def loss_sum(self, model, batch):
            labels = batch.pop("labels")
            with torch.autocast("cpu", dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                logits = model(**batch, use_cache=False).logits
            return answer_cross_entropy(logits, labels, reduction="sum", overwrite_logits=True)

    return Folded if side == "ours" else AllLogits


def run_ours(model_dir: Path, args) -> dict:
    """chatglm-sft's own loop: length-grouped batches (little padding) and logits only where answer tokens follow.
    Packing is off: measured here, SDPA with packing's block-diagonal mask ran slower (725 tokens/s) than grouped
    batches with their small padding (871 tokens/s)."""
    from chatglm_sft.train.config import load_config

    data = model_dir / "alpaca.json"
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            None,
            {
                "model": str(model_dir),
                "family": FAMILY,
                "data": str(data),
                "output": out,
                "method": "lora",
                "max_length": 1024,
                "batch_size": args.batch_size,
                "max_steps": args.steps + 1,
                "learning_rate": 1e-4,
                "precision": args.precision,
                "packing": "false",
                "logging_steps": 1000,
                "seed": 0,
                "group_by_length": args.side != "ours-plain",
            },
        )
        trainer = trainer_class(args.side, SHAPES[args.shape]["vocab"])(config)
        trainer.train_step(0)  # warm-up step, not timed
        trainer.optimizer_step(0.0)
        tokens, answers, start = 0, 0, time.perf_counter()
        for step in range(1, args.steps + 1):
            _, count = trainer.train_step(step)
            trainer.optimizer_step(0.0)
            micro, _ = trainer.step_examples(step)
            tokens += sum(len(x) for batch, weight in micro if weight for x, _ in batch)
            answers += count
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "answer_tokens": answers, "seconds": seconds, "peak_rss": peak_rss()}


def run_baseline(model_dir: Path, args) -> dict:
    """transformers Trainer + PEFT LoRA + DataCollatorForSeq2Seq, the way LLaMA-Factory sets it up by default."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    import chatglm_sft

    model = chatglm_sft.load_model(model_dir, dtype=torch.float32, family=FAMILY)
    tokenizer = chatglm_sft.load_tokenizer(model_dir, family=FAMILY)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    rows = examples(model_dir, SHAPES[args.shape]["vocab"])
    dataset = Dataset.from_dict(
        {
            "input_ids": [x for x, _ in rows],
            "labels": [y for _, y in rows],
            "attention_mask": [[1] * len(x) for x, _ in rows],
        }
    )
    timing = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == 1:  # the first step is warm-up, as for ours
                timing["start"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps + 1,
            learning_rate=1e-4,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            bf16=args.precision == "bf16",
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        counter = {"tokens": 0, "answer_tokens": 0}

        def collate(features):
            batch = collator(features)
            if "start" in timing:
                counter["tokens"] += int(batch["attention_mask"].sum())
                counter["answer_tokens"] += int((batch["labels"][:, 1:] != -100).sum())
            return batch

        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[Clock()])
        trainer.train()
        seconds = time.perf_counter() - timing["start"]
    return {**counter, "seconds": seconds, "peak_rss": peak_rss()}


def matmul_peak(dtype_name: str) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start)


def useful_flops(shape: dict, tokens: int, answer_tokens: int) -> float:
    """The work a LoRA step must do: forward plus backward through the frozen base (activation gradients only, as
    much work as the forward: 2 x 2 * params per token) for every real token, and the same through the output layer
    for the tokens whose logits the loss needs (LoRA's own small matrices and attention's quadratic part left out)."""
    return 2 * 2 * (decoder_params(shape) * tokens + shape["hidden"] * shape["vocab"] * answer_tokens)


def decoder_params(shape: dict) -> int:
    h, f = shape["hidden"], shape["ffn"]
    q, kv = shape["heads"] * shape["head_dim"], shape["groups"] * shape["head_dim"]
    return shape["layers"] * (h * (q + 2 * kv) + q * h + h * 2 * f + f * h)


def run_side(side: str, model_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model-dir", str(model_dir), "--shape", args.shape]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--precision", args.precision]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for a run of a few minutes)")
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, help="default: on for 6b-mix")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps = min(args.steps, 12 if args.shape == "small" else 6)
    shape = SHAPES[args.shape]
    if args.side:
        model_dir = Path(args.model_dir)
        result = (run_baseline if args.side == "baseline" else run_ours)(model_dir, args)
        print("RESULT " + json.dumps(result))
        return
    breakdown = args.shape == "6b-mix" if args.breakdown is None else args.breakdown
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp) / "model", shape)
        (model_dir / "alpaca.json").write_text((SHARED / "data/alpaca/alpaca_zh_demo.json").read_text())
        output_share = shape["hidden"] * shape["vocab"] / (decoder_params(shape) + shape["hidden"] * shape["vocab"])
        print(
            f"model ({args.shape}): ChatGLM2 architecture, hidden {shape['hidden']}, {shape['layers']} layers, FFN "
            f"{shape['ffn']}, vocab {shape['vocab']} (output layer {output_share:.1%} of a token's FLOPs); LoRA r 8; "
            f"batch {args.batch_size}; {args.steps} timed steps; {args.precision}"
        )
        sides = SIDES if breakdown else ("baseline", "ours")
        results = {side: run_side(side, model_dir, args) for side in sides}
        peak = matmul_peak(args.precision)
        rates = {side: r["tokens"] / r["seconds"] for side, r in results.items()}
        for side, r in results.items():
            flops = useful_flops(shape, r["tokens"], r["answer_tokens"]) / r["seconds"]
            print(
                f"{side:12s} {r['tokens']:7d} real tokens in {r['seconds']:7.1f} s = {rates[side]:8.1f} tokens/s   "
                f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB   {flops / 1e9:6.1f} GFLOP/s = {flops / peak:5.1%} of "
                f"{peak / 1e9:.0f} GFLOP/s matmul peak"
            )
        if breakdown:
            print(
                f"breakdown: other (our loop, same padding and logits) "
                f"{rates['ours-plain'] / rates['baseline']:.2f}x, padding removed (length grouping) "
                f"{rates['ours-grouped'] / rates['ours-plain']:.2f}x, logits skipped (answer tokens only) "
                f"{rates['ours'] / rates['ours-grouped']:.2f}x"
            )
        print(f"ratio {rates['ours'] / rates['baseline']:.2f}")


if __name__ == "__main__":
    main()
