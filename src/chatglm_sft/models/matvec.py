"""Products of a few rows (decoding) with bf16 weights on the CPU, through a matrix-vector kernel.

A decode step multiplies every weight matrix by one row per sequence, so its speed is how fast the weights stream
from memory. PyTorch's CPU `F.linear` sends bf16 rows through its matrix-matrix path: on the 2-core AVX512/AMX
machine it streamed a 4096×13696 weight for one row at 47% of the bandwidth `benchmarks/decode.py` measures, where
`torch.mv` reached 99%; on a 2-core AVX2 host (no bf16 instructions) it computed 8 rows at 20 GFLOPS, barely faster
than one row at a time. `cpu_kernels.bf16_matmul` streams the weight once for up to `cpu_kernels.MAX_ROWS` rows;
without it one row takes `torch.mv` (docs/benchmarks.md). Float32 weights are left as they are (`F.linear` already
takes a vector kernel for them), so float32 results stay bit-identical; more rows (prefill) take `F.linear` where the
CPU computes in bf16 natively, the kernel elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from chatglm_sft.models import cpu_kernels

HALF_PRECISION = (torch.bfloat16,)
"""Weight dtypes given the fast path (fp16's CPU matrix-vector kernel was not measured faster)."""


class MatVecLinear(nn.Linear):
    """`nn.Linear` whose inputs of a few rows (decoding) go through `cpu_kernels.bf16_matmul`, or, without those
    kernels, one row through `torch.mv`; the same parameters and state-dict names. On a CPU without bf16 arithmetic
    every number of rows goes through the kernel: a prompt too (PyTorch's bf16 product computes at a fifth of its
    float32 speed there), and a prompt's rows then get the same result alone or in a batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return super().forward(x)
        rows = None if not cpu_kernels.bf16_arithmetic() else cpu_kernels.MAX_ROWS
        kernels = cpu_kernels.for_input(x, self.weight, max_rows=rows)
        if kernels is not None:
            y = cpu_kernels.bf16_matmul(kernels, x, self.weight)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        if x.numel() != self.in_features:
            return super().forward(x)
        # The bias is added apart: `torch.addmv` with a bf16 bias ran ~10x slower than `torch.mv` on an AVX2 (AMD
        # EPYC) host, where `torch.mv` streams the weight at ~80% of the bandwidth (docs/benchmarks.md).
        y = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def use_matvec_kernels(model: nn.Module) -> int:
    """Give every bf16 `nn.Linear` of `model` that lives on the CPU the one-row fast path, in place (the class of
    each such layer changes, nothing else). Returns how many layers changed."""
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is nn.Linear and weight.device.type == "cpu" and weight.dtype in HALF_PRECISION:
            module.__class__ = MatVecLinear
            changed += 1
    return changed
