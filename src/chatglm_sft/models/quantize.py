"""Weight-only int8 / int4 quantization of the linear layers, for inference.

Both use PyTorch's own packed-weight kernels (the ones gpt-fast made known): `_weight_int8pack_mm` (int8 weights,
one scale per output channel) and `_weight_int4pack_mm[_for_cpu]` (int4 weights in groups along the input, a
scale and a zero point per group). Activations go in as bfloat16, the dtype those kernels are fast in, and come
out in the model's dtype. The embeddings and the output layer stay in full precision: they are a lookup and the
one matmul whose errors reach the logits directly.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("int8", "int4")
_COMPUTE = torch.bfloat16


def _int4_group_size(in_features: int) -> int | None:
    for group in (128, 64, 32):
        if in_features % group == 0:
            return group
    return None


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b, with q int8 [out, in] and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(_COMPUTE))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(_COMPUTE), self.weight_int8, self.scale)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """Asymmetric int4 in groups of `group_size` input columns: w = q * scale + min (q in 0..15)."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        groups = w.reshape(out_f, in_f // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
        # The kernels compute (q - 8) * scale + zero, so the zero point is the group minimum plus 8 steps.
        zero = low + 8 * scale
        self.cpu = w.device.type == "cpu"
        if self.cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        self.register_buffer("weight_int4", packed)
        scales_zeros = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).contiguous()
        self.register_buffer("scales_and_zeros", scales_zeros.to(_COMPUTE))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.group_size, self.in_features, self.out_features = group_size, in_f, out_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(_COMPUTE)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(flat, self.weight_int4, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace the decoder's `nn.Linear` layers (not the output layer) in place; returns the model."""
    if mode not in MODES:
        from chatglm_sft.errors import UserError

        raise UserError(f"unknown quantization {mode!r}; use int8 or int4")
    output = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is output:
                continue
            if mode == "int8":
                setattr(parent, name, Int8Linear(child))
            elif (group := _int4_group_size(child.in_features)) is not None and child.out_features % 8 == 0:
                setattr(parent, name, Int4Linear(child, group))
            else:
                setattr(parent, name, Int8Linear(child))  # shapes the int4 kernel cannot take
    model.config.chatglm_sft_quantization = mode
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the model holds in memory)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
