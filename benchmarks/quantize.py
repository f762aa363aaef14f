"""Weight-only quantization: memory, decode speed and logit error of fp32 / bf16 / int8 / int4.

A ChatGLM2-architecture `GlmForCausalLM` with random weights (default hidden 2048, 4 layers, FFN 5504, the real
65,024 vocabulary), greedy decoding of --new-tokens tokens after a 16-token prompt at batch 1 with the KV cache.
Memory is reported for the decoder's linear layers (what quantization changes) and for the whole model.

    python benchmarks/quantize.py [--hidden 2048] [--layers 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GlmForCausalLM
from transformers.cache_utils import DynamicCache

from chatglm_sft.models.quantize import quantize_model, weight_bytes
from chatglm_sft.models.synthetic import chatglm2_config, random_model


def linear_bytes(model) -> int:
    total = 0
    for layer in model.model.layers:
        total += weight_bytes(layer) - sum(
            p.numel() * p.element_size() for n, p in layer.named_parameters() if "layernorm" in n
        )
    return total


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    cache = DynamicCache()
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    first_logits = out.logits[0, -1].float()
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start), first_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    config = chatglm2_config(args.hidden, args.layers, args.ffn)
    base = random_model(config)
    prompt = torch.randint(0, 65024, (1, 16))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    reference = None
    print(
        f"hidden {args.hidden}, layers {args.layers}, ffn {args.ffn}, vocab 65024; batch 1, "
        f"{args.new_tokens} new tokens"
    )
    for name in ("fp32", "bf16", "int8", "int4"):
        model = GlmForCausalLM(config).eval()
        model.load_state_dict(state)
        if name != "fp32":  # quantized models keep bf16 embeddings (the output layer is quantized too)
            model = model.to(torch.bfloat16)
        if name in ("int8", "int4"):
            model = quantize_model(model, name)
        tokens_per_s, logits = decode(model, prompt, args.new_tokens)
        if name == "bf16":
            reference = logits
        error = (
            ""
            if reference is None
            else f"   logit error vs bf16 {((logits - reference).norm() / reference.norm()):.4f}"
        )
        print(
            f"{name:5s} linear weights {linear_bytes(model) / 2**20:8.1f} MiB   whole model "
            f"{weight_bytes(model) / 2**20:8.1f} MiB   decode {tokens_per_s:6.1f} tok/s{error}"
        )


if __name__ == "__main__":
    main()
