"""Several LoRA adapters in one batch: one forward pass with per-row adapters (PEFT's `adapter_names`, what the
server does) against grouping rows by adapter (one forward pass per adapter per step), and the base model alone.

Decodes --rows rows (half on adapter a, half on b) for --steps steps with `serve.batch.BatchRunner` and prints
seconds per step of each. The model is a generated ChatGLM2-shaped checkpoint (--hidden, --layers), float32.

    python benchmarks/serve_adapters.py [--rows 16] [--steps 64] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import chatglm_sft
from chatglm_sft.families import get_family
from chatglm_sft.infer.engine import Engine
from chatglm_sft.models.synthetic import write_tiny_checkpoint
from chatglm_sft.serve.adapters import load_adapters
from chatglm_sft.serve.batch import BatchRunner


def lora(model_dir: Path, out: Path, seed: int) -> str:
    family = get_family("chatglm2-6b")
    model = get_peft_model(
        chatglm_sft.load_model(model_dir), LoraConfig(r=8, target_modules=list(family.lora_targets))
    )
    g = torch.Generator().manual_seed(seed)
    for name, tensor in model.named_parameters():
        if "lora_" in name:
            tensor.data = torch.randn(tensor.shape, generator=g) * 0.1
    model.save_pretrained(out)
    return str(out)


def decode(runner: BatchRunner, prompts, adapters, steps: int) -> float:
    batch, logits = runner.prefill(prompts, adapters)
    tokens = logits.argmax(-1).tolist()
    start = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(batch, tokens).argmax(-1).tolist()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="serve-adapters-"))
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.hidden // 32, "head_dim": 32}
    model_dir = write_tiny_checkpoint(folder / "model", "chatglm2-6b", ffn=args.hidden * 3, **shape)
    dirs = {name: lora(model_dir, folder / name, seed) for name, seed in (("a", 1), ("b", 2))}
    tokenizer = chatglm_sft.load_tokenizer(model_dir)
    family = get_family("chatglm2-6b")
    torch.manual_seed(0)
    prompts = [torch.randint(100, 30000, (24,)).tolist() for _ in range(args.rows)]
    half = args.rows // 2

    base = Engine(chatglm_sft.load_model(model_dir, dtype=torch.float32), tokenizer)
    base_step = decode(BatchRunner(base), prompts, [None] * args.rows, args.steps)

    model, keys = load_adapters(chatglm_sft.load_model(model_dir, dtype=torch.float32), dirs, family)
    engine = Engine(model, tokenizer, family)
    per_row = BatchRunner(engine, adapter_names=True)
    mixed_step = decode(per_row, prompts, [keys["a"]] * half + [keys["b"]] * (args.rows - half), args.steps)

    grouped_step = 0.0
    for name, rows in (("a", prompts[:half]), ("b", prompts[half:])):
        model.set_adapter(keys[name])  # a whole batch on one adapter: no per-row routing
        grouped_step += decode(BatchRunner(engine), rows, [keys[name]] * len(rows), args.steps)

    print(f"{args.rows} rows, hidden {args.hidden}, {args.layers} layers, float32, {torch.get_num_threads()} threads")
    print(f"base model, one batch:            {base_step * 1e3:7.2f} ms/step")
    print(f"per-row adapters, one batch:      {mixed_step * 1e3:7.2f} ms/step")
    print(f"grouped by adapter, two batches:  {grouped_step * 1e3:7.2f} ms/step")
    print(f"per-row / grouped: {mixed_step / grouped_step:.2f}")


if __name__ == "__main__":
    main()
