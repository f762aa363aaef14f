"""The sections of `benchmarks/gpu_suite.sh`: each runs in its own process (its own peak memory) and writes one JSON
file; `--report` gathers them into `suite.json` and a markdown table `suite.md`.

ChatGLM2-6B-shape random weights (or `--shape tiny` for a check that runs on a CPU), bf16, LoRA r 8, batch 4 x 1024
on alpaca_zh (../shared/data/alpaca/alpaca_zh_demo.json with the real ChatGLM2 tokenizer when present, else
generated records and a generated tokenizer):

* train-*: chatglm-sft's loop and transformers Trainer + PEFT (DataCollatorForSeq2Seq, dynamic padding) side by
  side, gradient checkpointing off and on, and ours with packing: samples/s, real tokens/s, MFU against the measured
  bf16 matmul peak (useful FLOPs: 4 x decoder parameters per real token + 4 x the output layer per answer token),
  peak memory;
* qlora: peak memory of a QLoRA step at batch 1 x 1024 (anchor: LLaMA-Factory's 5.14 GB); CUDA only;
* decode: bf16 / int8 / int4 through our `Engine` at batch 1 (tok/s) and the logit error of int8 / int4 against bf16;
* dpo: one DPO step (LoRA, reference = the adapter disabled) on pairs made from the same records.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAPES = {
    "6b": {"hidden": 4096, "layers": 28, "ffn": 13696, "head_dim": 128, "groups": 2, "length": 1024, "steps": 5},
    "tiny": {"hidden": 64, "layers": 2, "ffn": 128, "head_dim": 16, "groups": 2, "length": 64, "steps": 1},
}
TRAIN = {
    "train-ours": {"side": "ours"},
    "train-ours-gc": {"side": "ours", "gc": True},
    "train-ours-packing": {"side": "ours", "packing": True},
    "train-baseline": {"side": "baseline"},
    "train-baseline-gc": {"side": "baseline", "gc": True},
}
SECTIONS = (*TRAIN, "qlora", "decode", "dpo")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory allocated, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a square bf16 matmul, the MFU denominator. On a CPU the suite only checks that it runs, so the
    product is small: without bf16 instructions (AVX2 only) a 1024-wide one took 2.5 s, and 15 s per section."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3 if gpu else 1):
        a @ a
    synchronize(device)
    start, reps = time.perf_counter(), 20 if gpu else 3
    for _ in range(reps):
        a @ a
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


# --- the model and the data ----------------------------------------------------------------------------------------


def records(count: int = 1000) -> list[dict]:
    alpaca = SHARED / "data/alpaca/alpaca_zh_demo.json"
    if alpaca.exists():
        return json.loads(alpaca.read_text())[:count]
    from chatglm_sft.demo.problems import make_problems

    return [{"instruction": p["question"], "input": "", "output": p["solution"]} for p in make_problems(count, 0)]


def setup(work: Path, shape_name: str) -> None:
    """The model folder (THUDM layout, bf16), alpaca.json and pairs.json under `work`."""
    from transformers import GlmForCausalLM

    from chatglm_sft.models.synthetic import chatglm2_config, write_thudm_checkpoint
    from chatglm_sft.tokenization.synthetic import write_tokenizer

    shape = SHAPES[shape_name]
    model_dir = work / "model"
    config = chatglm2_config(shape["hidden"], shape["layers"], shape["ffn"], shape["head_dim"], shape["groups"])
    torch.manual_seed(0)
    model = GlmForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    write_thudm_checkpoint(model, model_dir)
    del model
    real = SHARED / "reference/models/chatglm2-6b"
    if real.exists():
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copyfile(real / name, model_dir / name)
    else:
        write_tokenizer(model_dir, "chatglm2-6b")
    rows = records(1000 if shape_name == "6b" else 100)
    (work / "alpaca.json").write_text(json.dumps(rows, ensure_ascii=False))
    rng = random.Random(0)
    pairs = [
        {"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["output"], "rejected": o["output"]}
        for r, o in zip(rows, rng.sample(rows, len(rows)), strict=True)
    ]
    (work / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False))


def useful_flops(model_dir: Path, tokens: int, answer_tokens: int) -> float:
    """4 x decoder parameters per real token (forward and activation gradients) + 4 x the output layer per answer."""
    from safetensors import safe_open

    decoder = output = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                numel = int(torch.tensor(f.get_slice(name).get_shape()).prod())
                if "output_layer" in name:
                    output += numel
                elif "word_embeddings" not in name:
                    decoder += numel
    return 4 * (decoder * tokens + output * answer_tokens)


# --- training ------------------------------------------------------------------------------------------------------


def train_config(work: Path, args, **overrides):
    from chatglm_sft.train.config import load_config

    values = {
        "model": str(work / "model"),
        "data": str(work / "alpaca.json"),
        "output": str(work / "out"),
        "method": "lora",
        "max_length": SHAPES[args.shape]["length"],
        "batch_size": 4,
        "max_steps": SHAPES[args.shape]["steps"] + 1,
        "precision": "bf16",
        "device": args.device,
        "logging_steps": 1000,
        "seed": 0,
    }
    return load_config(None, values | overrides)


def timed_steps(trainer, steps: int, device) -> tuple[float, int, int, int]:
    """(seconds, samples, real tokens, answer tokens) of `steps` steps after one warm-up step."""
    trainer.train_step(0)
    trainer.optimizer_step(0.0)
    synchronize(device)
    reset_peak(device)
    samples = tokens = answers = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        _, count = trainer.train_step(step)
        trainer.optimizer_step(0.0)
        micro, _ = trainer.step_examples(step)
        batch = [x for examples, weight in micro if weight for x, _ in examples]
        samples, tokens, answers = samples + len(batch), tokens + sum(map(len, batch)), answers + count
    synchronize(device)
    return time.perf_counter() - start, samples, tokens, answers


def run_ours(work: Path, args, gc: bool = False, packing: bool = False) -> dict:
    from chatglm_sft.train.loop import Trainer

    trainer = Trainer(train_config(work, args, gradient_checkpointing=gc, packing=packing))
    seconds, samples, tokens, answers = timed_steps(trainer, SHAPES[args.shape]["steps"], trainer.d.device)
    return result(work, args, seconds, samples, tokens, answers)


def run_baseline(work: Path, args, gc: bool = False, packing: bool = False) -> dict:
    """transformers Trainer + PEFT LoRA + DataCollatorForSeq2Seq, as LLaMA-Factory sets it up by default."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    import chatglm_sft
    from chatglm_sft.data.dataset import check_records, tokenize_records

    device = torch.device(args.device)
    model = chatglm_sft.load_model(work / "model", dtype=torch.bfloat16, device=device)
    tokenizer = chatglm_sft.load_tokenizer(work / "model")
    if gc:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    report = check_records(work / "alpaca.json", family=tokenizer.family)
    tokenized = tokenize_records(tokenizer, [m for _, m in report.good], SHAPES[args.shape]["length"])
    dataset = Dataset.from_dict(
        {"input_ids": tokenized.input_ids, "labels": tokenized.labels}
        | {"attention_mask": [[1] * len(x) for x in tokenized.input_ids]}
    )
    steps, clock, counts = SHAPES[args.shape]["steps"], {}, {"samples": 0, "tokens": 0, "answers": 0}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            synchronize(device)
            if state.global_step == 1:  # the first step is warm-up, as for ours
                reset_peak(device)
                clock["start"] = time.perf_counter()

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = collator(features)
        if "start" in clock:
            counts["samples"] += len(features)
            counts["tokens"] += int(batch["attention_mask"].sum())
            counts["answers"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=4,
            max_steps=steps + 1,
            learning_rate=1e-4,
            save_strategy="no",
            report_to=[],
            bf16=True,
            use_cpu=device.type == "cpu",
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            logging_steps=1000,
        )
        Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[Clock()]).train()
        synchronize(device)
        seconds = time.perf_counter() - clock["start"]
    return result(work, args, seconds, counts["samples"], counts["tokens"], counts["answers"])


def result(work: Path, args, seconds: float, samples: int, tokens: int, answers: int) -> dict:
    device = torch.device(args.device)
    flops = useful_flops(work / "model", tokens, answers) / seconds
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / matmul_peak(device),
        "peak_memory_gib": peak_memory(device) / 2**30,
    }


def run_qlora(work: Path, args) -> dict:
    from chatglm_sft.train.loop import Trainer

    if not args.device.startswith("cuda"):
        return {"skipped": "QLoRA (bitsandbytes 4-bit) needs CUDA"}
    config = train_config(work, args, method="qlora", batch_size=1, packing=True)
    trainer = Trainer(config)
    seconds, samples, tokens, answers = timed_steps(trainer, SHAPES[args.shape]["steps"], trainer.d.device)
    return result(work, args, seconds, samples, tokens, answers) | {"anchor_llama_factory_gib": 5.14 * 1e9 / 2**30}


def run_dpo(work: Path, args) -> dict:
    from chatglm_sft.train.config import OBJECTIVES

    if "dpo" not in OBJECTIVES:
        return {"skipped": "no --objective dpo in this version"}
    from chatglm_sft.train.preference import PreferenceTrainer

    config = train_config(work, args, data=str(work / "pairs.json"), objective="dpo", batch_size=2)
    trainer = PreferenceTrainer(config)
    trainer.train_step(0)
    trainer.optimizer_step(0.0)
    synchronize(trainer.d.device)
    reset_peak(trainer.d.device)
    start = time.perf_counter()
    trainer.train_step(1)
    trainer.optimizer_step(0.0)
    synchronize(trainer.d.device)
    return {"step_seconds": time.perf_counter() - start, "peak_memory_gib": peak_memory(trainer.d.device) / 2**30}


# --- decoding ------------------------------------------------------------------------------------------------------


def run_decode(work: Path, args) -> dict:
    import chatglm_sft
    from chatglm_sft.infer.engine import Engine
    from chatglm_sft.infer.sampling import SamplingParams

    device = torch.device(args.device)
    tokenizer = chatglm_sft.load_tokenizer(work / "model")
    prompt = tokenizer.encode(records(1)[0]["instruction"])
    new_tokens = 64 if args.shape == "6b" else 8
    out, reference = {}, None
    for mode in ("bf16", "int8", "int4"):
        model = chatglm_sft.load_model(
            work / "model", dtype=torch.bfloat16, device=device, quantize=None if mode == "bf16" else mode
        )
        with torch.inference_mode():
            logits = model(torch.tensor([prompt], device=device)).logits[0].float()
        steps = Engine(model, tokenizer).decode_steps([prompt], SamplingParams(max_new_tokens=new_tokens + 1))
        next(steps)
        synchronize(device)
        start = time.perf_counter()
        for _ in steps:
            pass
        synchronize(device)
        reference = logits if reference is None else reference
        out[mode] = {
            "tokens_per_s": new_tokens / (time.perf_counter() - start),
            "logit_error": ((logits - reference).norm() / reference.norm()).item(),
        }
        del model
    return out


# --- the report ----------------------------------------------------------------------------------------------------


def report(folder: Path) -> None:
    sections = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("section-*.json"))}
    suite = {"meta": json.loads((folder / "meta.json").read_text())} | {
        k.removeprefix("section-"): v for k, v in sections.items()
    }
    (folder / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    lines = [f"GPU suite: {suite['meta']['device_name']}, shape {suite['meta']['shape']}, {suite['meta']['date']}", ""]
    lines += ["| run | samples/s | tokens/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|"]
    for name in (*TRAIN, "qlora"):
        r = suite.get(name, {"error": "not run"})
        if "samples_per_s" in r:
            lines.append(
                f"| {name} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | "
                f"{r['peak_memory_gib']:.2f} |"
            )
        else:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | |")
    decode = suite.get("decode", {})
    lines += ["", "| decode | tok/s (batch 1) | logit error vs bf16 |", "|---|---|---|"]
    for mode, r in decode.items() if "error" not in decode else []:
        lines.append(f"| {mode} | {r['tokens_per_s']:.1f} | {r['logit_error']:.4f} |")
    dpo = suite.get("dpo", {})
    lines += ["", f"dpo: {dpo.get('skipped') or dpo.get('error') or json.dumps(dpo)}"]
    (folder / "suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="6b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, required=True, help="where the model, data and section results go")
    parser.add_argument("--setup", action="store_true")
    parser.add_argument("--section", choices=SECTIONS)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.setup:
        setup(args.work, args.shape)
        device = torch.device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        meta = {"shape": args.shape, "device": args.device, "device_name": name, "date": time.strftime("%Y-%m-%d")}
        (args.work / "meta.json").write_text(json.dumps(meta | {"torch": torch.__version__}) + "\n")
    if args.section:
        if args.section in TRAIN:
            spec = TRAIN[args.section]
            run = run_ours if spec["side"] == "ours" else run_baseline
            out = run(args.work, args, gc=spec.get("gc", False), packing=spec.get("packing", False))
        else:
            out = {"qlora": run_qlora, "decode": run_decode, "dpo": run_dpo}[args.section](args.work, args)
        (args.work / f"section-{args.section}.json").write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out))
    if args.report:
        report(args.work)


if __name__ == "__main__":
    sys.exit(main())
