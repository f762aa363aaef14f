"""One-row products through a matrix-vector kernel on the CPU, for decoding at batch 1.

A decode step at batch 1 multiplies every weight matrix by a single row, so its speed is how fast the weights stream
from memory. For bf16 weights PyTorch's CPU `F.linear` sends that row through its matrix-matrix path, which on the
2-core AVX512/AMX machine streamed a 4096×13696 weight at 47% and a 65024×2048 one at 81% of the bandwidth
`benchmarks/decode.py` measures; `torch.addmv` streamed the same weights at 99% and 124% (docs/benchmarks.md). Float32
weights gain nothing (`F.linear` already takes a vector kernel for them) and are left as they are, so float32 results
stay bit-identical; several rows (prefill, batches) take `F.linear` as before.
"""

from __future__ import annotations

import torch
from torch import nn

HALF_PRECISION = (torch.bfloat16,)
"""Weight dtypes given the fast path (fp16's CPU matrix-vector kernel was not measured faster)."""


class MatVecLinear(nn.Linear):
    """`nn.Linear` whose one-row inputs go through `torch.addmv`; the same parameters and state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features or x.dtype != self.weight.dtype:
            return super().forward(x)
        row = x.reshape(-1)
        y = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
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
