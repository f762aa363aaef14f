"""LoRA training speed of the full ChatGLM2-6B shape on a GPU: samples/s, MFU, peak memory.

Random weights in bf16, LoRA r 8 on q/k/v/o, batch 4 x 1024 tokens (every token a target, as in LLaMA-Factory's
published benchmark: 21.67 samples/s on an A100 for ChatGLM2-6B LoRA at 4 x 1024), with gradient checkpointing off
and on. The step is chatglm-sft's: bf16 autocast, AdamW on the LoRA weights, cross-entropy in fp32.

    python benchmarks/gpu_train.py                      # on a GPU
    python benchmarks/gpu_train.py --shape tiny --device cpu --steps 2   # a check that it runs
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from gpu_suite import matmul_peak, synchronize  # benchmarks/gpu_suite.py: the same peak and device sync
from peft import LoraConfig, get_peft_model
from transformers import GlmConfig, GlmForCausalLM

SHAPES = {
    "6b": {
        "hidden_size": 4096,
        "num_hidden_layers": 28,
        "num_attention_heads": 32,
        "head_dim": 128,
        "num_key_value_heads": 2,
        "intermediate_size": 13696,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "head_dim": 16,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    },
}


def run(shape: str, device, batch: int, length: int, steps: int, checkpointing: bool) -> dict:
    config = GlmConfig(
        vocab_size=65024,
        max_position_embeddings=max(2048, length),
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=[2],
        **SHAPES[shape],
    )
    with torch.device(device):
        model = GlmForCausalLM(config).to(torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 65024, (batch, length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    n_params = sum(p.numel() for p in model.parameters())
    # forward + activation gradients through the frozen base: 2 x 2 * params per token
    flops = 4 * n_params * batch * length / seconds
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"samples_per_s": batch / seconds, "flops": flops, "peak_memory": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="6b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}; ChatGLM2 {args.shape} shape, LoRA r 8, bf16, batch {args.batch_size} x {args.length}; measured "
        f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s"
    )
    for checkpointing in (False, True):
        r = run(args.shape, device, args.batch_size, args.length, args.steps, checkpointing)
        print(
            f"gradient checkpointing {'on ' if checkpointing else 'off'}: {r['samples_per_s']:.2f} samples/s, "
            f"MFU {r['flops'] / peak:.1%}, peak memory {r['peak_memory'] / 2**30:.1f} GiB"
        )


if __name__ == "__main__":
    main()
