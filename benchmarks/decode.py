"""Decode speed with the KV cache at batch 1 and 8, against the floor set by reading the weights once per step.

A ChatGLM2-architecture `GlmForCausalLM` with random weights; the machine's memory bandwidth is measured here (a
large in-memory reduction), so the floor is `weight bytes / bandwidth` seconds per decode step.

    python benchmarks/decode.py [--hidden 2048] [--layers 4] [--dtype bf16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.cache_utils import DynamicCache

from chatglm_sft.models.synthetic import chatglm2_config, random_model


def bandwidth() -> float:
    """Bytes per second for streaming through 1 GiB of memory (best of 5)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


@torch.inference_mode()
def decode_rate(model, batch: int, new_tokens: int) -> float:
    prompt = torch.randint(0, 65024, (batch, 16))
    cache = DynamicCache()
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    return batch * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    config = chatglm2_config(args.hidden, args.layers, args.ffn)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = random_model(config).to(dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # A decode step reads every weight except the embedding table, of which it reads one row per token.
    streamed = weights - model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    bw = bandwidth()
    print(
        f"hidden {args.hidden}, layers {args.layers}, ffn {args.ffn}, vocab 65024, {args.dtype}: "
        f"{streamed / 2**20:.0f} MiB read per step; memory bandwidth {bw / 1e9:.1f} GB/s"
    )
    for batch in (1, 8):
        rate = decode_rate(model, batch, args.new_tokens)
        floor = batch * bw / streamed
        print(f"batch {batch}: {rate:7.1f} tokens/s; weight-read bound {floor:7.1f} tokens/s ({rate / floor:.0%})")


if __name__ == "__main__":
    main()
