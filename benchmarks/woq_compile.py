"""Weight-only int8/int4 layers at 1 and 8 rows: PyTorch's ATen kernels against Inductor's C++ GEMM template.

`torch.compile` with max-autotune and frozen weights can lower `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` to a generated kernel with an AMX micro-kernel; this measures whether that makes 8 rows
cheap enough for decoding at batch 8 to reach 4x batch 1 (issue 20's goal), on one layer of ChatGLM2/3-6B's FFN
shape, the engine's own `Int8Linear` / `Int4Linear`. Each call is timed after a read of 256 MiB that flushes the
caches; medians of `--calls`. The FX graph cache is off: with it, a process once got back another process's frozen
constants for the same shapes. Figures: docs/benchmarks.md.

    python benchmarks/woq_compile.py [--in-features 4096] [--out-features 13696] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor

from chatglm_sft.models.quantize import Int4Linear, Int8Linear


def median_ms(fn, x: torch.Tensor, calls: int) -> float:
    flush = torch.ones(64 * 2**20)
    fn(x)
    times = []
    for _ in range(calls):
        flush.sum()
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=13696)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    patch = {
        "freezing": True,
        "max_autotune": True,
        "max_autotune_gemm_backends": "CPP,ATEN",
        "fx_graph_cache": False,
    }
    linear = torch.nn.Linear(args.in_features, args.out_features, bias=False).to(torch.bfloat16)
    print(f"one {args.out_features}x{args.in_features} layer, bf16 rows, torch threads {torch.get_num_threads()}")
    with torch.no_grad(), inductor.patch(patch):
        for name, layer in (("int8", Int8Linear(linear).eval()), ("int4", Int4Linear(linear, 128).eval())):
            ms = {}
            for rows in (1, 8):
                x = torch.randn(rows, args.in_features, dtype=torch.bfloat16)
                compiled = torch.compile(layer, dynamic=False)
                start = time.perf_counter()
                y = compiled(x)
                took = time.perf_counter() - start
                ref = layer(x)
                error = ((y - ref).abs().max() / ref.abs().max()).item()
                ms[rows] = median_ms(layer, x, args.calls), median_ms(compiled, x, args.calls)
                print(
                    f"{name} rows {rows}: ATen {ms[rows][0]:6.2f} ms, compiled {ms[rows][1]:6.2f} ms "
                    f"(compile {took:.1f} s, relative difference {error:.1e})"
                )
            aten, best_at_8 = 8 * ms[1][0] / ms[8][0], 8 * ms[1][0] / min(ms[8])
            print(f"{name} 8 rows / 1 row, rows per second: ATen {aten:.2f}x, compiled at 8 rows {best_at_8:.2f}x")


if __name__ == "__main__":
    main()
