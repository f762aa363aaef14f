"""The whole decode step under `torch.compile` against eager, at batch 1 and 8: what compiling would give the engine.

`benchmarks/woq_compile.py` showed, one layer at a time, that Inductor's C++ GEMM template (AMX) makes an int8
weight-only layer at 8 rows cost little more than at 1 row, but only with the weights frozen into the graph. This
script measures the way in that it named: the whole step of decode.py's model (ChatGLM2-6B's layer shape, random
weights, loaded with `load_model` and its `--quantize`) compiled with `freezing` and `max-autotune` over a static KV
cache (transformers' `StaticCache`, so every step has the same shapes and compiles once per batch size). Eager runs
the same calls on the same cache. Greedy, a 16-token prompt; the median step after two warm-up steps; the compile
time is the first compiled steps' wall time. A random model's logits are nearly flat, so greedy tokens are not
compared; the first step's logits are (the largest difference, against the largest logit).

    python benchmarks/decode_step_compile.py [--quantize int8|int4|none] [--layers 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._inductor.config as inductor
from decode import random_loaded_model  # benchmarks/decode.py: the same model, loaded the same way
from transformers import StaticCache

PROMPT = 16


def decode(step, model, batch: int, steps: int) -> tuple[float, torch.Tensor]:
    """Median seconds of a decode step after two warm-up steps, and the first step's logits."""
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + steps + 1)
    ids = torch.randint(100, 60000, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        logits = step(ids, torch.arange(PROMPT).expand(batch, PROMPT), cache, torch.arange(PROMPT))
        times, first = [], None
        for position in range(PROMPT, PROMPT + steps):
            start = time.perf_counter()
            logits = step(logits.argmax(-1, keepdim=True), torch.full((batch, 1), position), cache,
                          torch.tensor([position]))  # fmt: skip
            times.append(time.perf_counter() - start)
            first = logits.float() if first is None else first
    times = sorted(times[2:])
    return times[len(times) // 2], first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", choices=["int8", "int4", "none"], default="int8")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    inductor.freezing = True  # the GEMM template prepacks frozen weights; without it Inductor keeps ATen's kernel
    inductor.fx_graph_cache = False  # it once handed a process another process's frozen weights (woq_compile.py)
    inductor.max_autotune_gemm_backends = "CPP,ATEN"
    model = random_loaded_model(4096, args.layers, 13696, "bf16" if args.quantize == "none" else args.quantize)

    def step(ids, positions, cache, cache_position):
        out = model(input_ids=ids, position_ids=positions, cache=cache, cache_position=cache_position,
                    use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]

    compiled = torch.compile(step, mode="max-autotune-no-cudagraphs")
    print(f"hidden 4096, ffn 13696, {args.layers} layers, vocab 65024, {args.quantize}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    rates = {}
    for batch in (1, 8):
        eager_step, eager_logits = decode(step, model, batch, args.steps)
        start = time.perf_counter()
        decode(compiled, model, batch, 3)
        compile_seconds = time.perf_counter() - start
        compiled_step, compiled_logits = decode(compiled, model, batch, args.steps)
        error = (compiled_logits - eager_logits).abs().max() / eager_logits.abs().max()
        rates[batch] = (batch / eager_step, batch / compiled_step)
        print(f"batch {batch}: eager {eager_step * 1e3:6.1f} ms/step ({rates[batch][0]:5.1f} tok/s), compiled "
              f"{compiled_step * 1e3:6.1f} ms/step ({rates[batch][1]:5.1f} tok/s) after {compile_seconds:.0f} s of "
              f"compiling; first logits differ by {error:.1e} of the largest")  # fmt: skip
    eager, compiled = (rates[8][k] / rates[1][k] for k in (0, 1))
    print(f"batch 8 / batch 1 tok/s: eager {eager:.1f}x, compiled {compiled:.1f}x")


if __name__ == "__main__":
    main()
