"""Decode speed of our `Engine` (the loop predict, chat and serve run) at batch 1 and 8, against the floor set by
reading the weights once per step.

A ChatGLM2-architecture model with random weights written in THUDM's layout and loaded with `load_model` (so int8 /
int4 go through the same quantization as `--quantize`); greedy, a 16-token prompt, `--new-tokens` tokens, no stop.
Its layers have ChatGLM2/3-6B's shape by default (hidden 4096, FFN 13696, 2 KV groups; 4 of the 28 layers): a
step's fixed costs (norms, rotary, attention, sampling: ~2 ms a layer here) are then the share of a step they are in
the real model (~7%); at hidden 2048 they weigh 4.7 times more against the weights. The machine's memory bandwidth
is measured here (a large in-memory reduction, in the kind of pages the engine gives the weights), so the floor is
`bytes read per decode step / bandwidth`. A decode step reads every weight except the embedding table, of which it
reads a row.

    python benchmarks/decode.py [--hidden 4096] [--ffn 13696] [--layers 4] [--dtype bf16|fp32|int8|int4]
        [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.models import huge_pages
from chatglm_sft.models.loading import load_model
from chatglm_sft.models.quantize import weight_bytes
from chatglm_sft.models.synthetic import chatglm2_config, random_model, write_thudm_checkpoint


def random_loaded_model(hidden: int, layers: int, ffn: int, dtype: str):
    """A ChatGLM2-architecture model with random weights, written in THUDM's layout and read back with `load_model`
    in `dtype` (fp32, bf16, or int8/int4 over bf16: the same quantization as `--quantize`)."""
    config = chatglm2_config(hidden, layers, ffn)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_thudm_checkpoint(random_model(config).to(torch_dtype), Path(tmp) / "model")
        quantize = dtype if dtype in ("int8", "int4") else None
        return load_model(folder, dtype=torch_dtype, quantize=quantize)


def bandwidth() -> float:
    """Bytes per second for streaming through 1 GiB of memory (best of 5), in the kind of pages the engine gives the
    weights (`huge_pages`: on a host whose THP mode is `madvise`, huge pages read ~8% faster than 4 KiB ones)."""
    x = huge_pages.empty((256 * 1024 * 1024,), torch.float32).fill_(1)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def decode_rate(engine: Engine, batch: int, new_tokens: int) -> float:
    """Tokens per second over the decode steps (the prefill and first token not counted)."""
    prompts = torch.randint(100, 60000, (batch, 16), generator=torch.Generator().manual_seed(batch)).tolist()
    steps = engine.decode_steps(prompts, SamplingParams(max_new_tokens=new_tokens + 1))
    next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return batch * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=13696)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], default="bf16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = random_loaded_model(args.hidden, args.layers, args.ffn, args.dtype)
    table = model.get_input_embeddings().weight
    streamed = weight_bytes(model) - table.numel() * table.element_size()
    engine = Engine(model, tokenizer=None)
    decode_rate(engine, 1, 4)  # warm-up
    # The host's speed drifts from minute to minute (other tenants), so each round measures the bandwidth just before
    # its decoding and a share is taken within a round; the round with the median share is reported.
    rounds = []
    for _ in range(args.rounds):
        bw = bandwidth()
        rounds.append((bw, {batch: decode_rate(engine, batch, args.new_tokens) for batch in (1, 8)}))
    print(
        f"hidden {args.hidden}, layers {args.layers}, ffn {args.ffn}, vocab 65024, {args.dtype}: "
        f"{streamed / 2**20:.0f} MiB read per step; memory bandwidth {min(r[0] for r in rounds) / 1e9:.1f}-"
        f"{max(r[0] for r in rounds) / 1e9:.1f} GB/s; torch threads {torch.get_num_threads()}; "
        f"the median of {args.rounds} rounds"
    )
    for batch in (1, 8):
        shares = sorted((rates[batch] * streamed / (batch * bw), bw, rates[batch]) for bw, rates in rounds)
        share, bw, rate = shares[len(shares) // 2]
        floor = batch * bw / streamed
        print(f"batch {batch}: {rate:7.1f} tokens/s; weight-read bound {floor:7.1f} tokens/s ({share:.0%})")


if __name__ == "__main__":
    main()
