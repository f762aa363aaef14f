"""Weight-only int8 / int4 quantization of the linear layers, for inference.

int8 weights have one scale per output channel, int4 weights a scale and a zero point per group along the input.
On the CPU, decoding-sized inputs go through `cpu_kernels` (ours, compiled on first use; int4 at any size, with its
codes in the portable layout); otherwise PyTorch's packed-weight kernels (the ones gpt-fast made known) run:
`_weight_int8pack_mm` and `_weight_int4pack_mm[_for_cpu]`, with activations in bfloat16, the dtype they are fast in.
Results come out in the model's dtype. The output layer is quantized too (as chatglm.cpp does): at batch 1
decoding reads every weight once per token, and the 65k-151k-entry output layer is a large share of them. The
embeddings stay in full precision: a lookup reads one row per token.

A quantized model can be saved (`quantized_state`) and loaded back without quantizing again (`prepare_quantized`
before the tensors are assigned, `finish_quantized` after): int4 codes are saved in a portable layout
(`weight_uint4`: two codes a byte, the even column in the high nibble), which the CPU kernels read as they are
and which is packed for PyTorch's kernel elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from chatglm_sft.models import cpu_kernels

MODES = ("int8", "int4")
_COMPUTE = torch.bfloat16


def _int4_group_size(in_features: int) -> int | None:
    for group in (128, 64, 32):
        if in_features % group == 0:
            return group
    return None


def _bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel: (codes int8 [out, in], scales [out])."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b, with q int8 [out, in] and one scale per output channel."""

    def __init__(self, linear: nn.Linear | None = None, *, shape: tuple[int, int] | None = None, bias: bool = False):
        """From a float `linear`, or (`shape` = (out, in)) an empty module whose buffers a state dict fills."""
        super().__init__()
        if linear is not None:
            q, scale = int8_codes(linear.weight)
            self.bias = _bias(linear)
        else:
            q, scale = torch.empty(shape, dtype=torch.int8), torch.empty(shape[0])
            self.bias = nn.Parameter(torch.empty(shape[0]), requires_grad=False) if bias else None
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(_COMPUTE))
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # Any number of rows: ours were 1.3-1.9x as fast as PyTorch's at prefill sizes (16-64 rows), and each row's
        # products add up exactly in integers and then in a fixed order in float32, so a prompt's rows get the same
        # result alone or in a batch of any size.
        kernels = cpu_kernels.for_input(x, self.weight_int8, max_rows=None)
        if kernels is not None:
            y = cpu_kernels.int8_matmul(kernels, x, self.weight_int8, self.scale.float())
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(_COMPUTE), self.weight_int8, self.scale)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group_size` input columns: (codes 0..15 int32 [out, in], scales_and_zeros
    [in / group, out, 2] in bfloat16), with w ~ (q - 8) * scale + zero as the kernels compute it."""
    w = w.detach().float()
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    zero = low + 8 * scale  # the kernels compute (q - 8) * scale + zero: the group minimum plus 8 steps
    scales_zeros = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).contiguous()
    return q, scales_zeros.to(_COMPUTE)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in the layout of the device's kernel."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)


def portable_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes two a byte, the even column in the high nibble: the saved layout, the same on every device."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def _unpack_portable(packed: torch.Tensor) -> torch.Tensor:
    q = torch.stack([packed >> 4, packed & 15], dim=-1).to(torch.int32)
    return q.reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """Asymmetric int4 in groups of `group_size` input columns: w = (q - 8) * scale + zero (q in 0..15).

    On the CPU with `cpu_kernels` built, the codes stay in the portable layout (`weight_uint4`), which those kernels
    read for any number of rows; otherwise they are packed for PyTorch's kernel on their device (`weight_int4`)."""

    def __init__(
        self,
        linear: nn.Linear | None,
        group_size: int,
        *,
        shape: tuple[int, int] | None = None,
        bias: bool = False,
    ):
        """From a float `linear`, or (`shape` = (out, in)) an empty module that a saved state fills (its codes come
        in the portable layout and are arranged for the device as they are loaded: `pack_loaded`)."""
        super().__init__()
        if linear is not None:
            q, scales_zeros = int4_codes(linear.weight, group_size)
            self.register_buffer("weight_uint4", portable_int4(q))
            self.bias = _bias(linear)
        else:
            out_f, in_f = shape
            self.register_buffer("weight_uint4", torch.empty(out_f, in_f // 2, dtype=torch.uint8))
            scales_zeros = torch.empty(in_f // group_size, out_f, 2, dtype=_COMPUTE)
            self.bias = nn.Parameter(torch.empty(out_f), requires_grad=False) if bias else None
        self.register_buffer("scales_and_zeros", scales_zeros)
        self.group_size = group_size
        self.out_features, self.in_features = scales_zeros.shape[1], scales_zeros.shape[0] * group_size
        if linear is not None:
            self.pack_loaded()

    def pack_loaded(self) -> None:
        """Codes in the portable layout (`weight_uint4`) -> the layout of the kernel on their device."""
        if self.weight_uint4.device.type != "cpu" or cpu_kernels.library() is None:
            self.weight_int4 = _pack_int4(_unpack_portable(self.weight_uint4))
            del self.weight_uint4
            if hasattr(self, "scale_zero_rows"):
                del self.scale_zero_rows
        elif not hasattr(self, "scale_zero_rows"):
            # The CPU kernel reads a row's scales together; kept beside `scales_and_zeros` (the saved layout, 1/32
            # of the codes' size), not in the state dict.
            rows = self.scales_and_zeros.transpose(0, 1).contiguous()
            self.register_buffer("scale_zero_rows", rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        codes = getattr(self, "weight_uint4", None)
        if codes is not None and (codes.device.type != "cpu" or cpu_kernels.library() is None):
            self.pack_loaded()  # moved to another device since, or the kernels turned off: PyTorch's kernel
            codes = None
        if codes is not None:
            y = cpu_kernels.int4_matmul(cpu_kernels.library(), x, codes, self.scale_zero_rows, self.group_size)
        else:
            flat = x.reshape(-1, shape[-1]).to(_COMPUTE).contiguous()  # the kernel takes contiguous rows only
            if self.weight_int4.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    flat, self.weight_int4, self.group_size, self.scales_and_zeros
                )
            else:
                y = torch.ops.aten._weight_int4pack_mm(flat, self.weight_int4, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        from chatglm_sft.errors import UserError

        raise UserError(f"unknown quantization {mode!r}; use int8 or int4")


def _targets(model: nn.Module, mode: str) -> Iterator[tuple[str, nn.Module, str, nn.Linear, int | None]]:
    """Every linear layer to quantize: (qualified name, parent, attribute, layer, int4 group size or None for
    int8). Shapes the int4 kernel cannot take fall back to int8."""
    for parent_name, parent in list(model.named_modules()):
        if "prefix_encoder" in parent_name.split("."):  # a P-Tuning prefix is tiny and stays in floating point
            continue
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            group = _int4_group_size(child.in_features) if mode == "int4" and child.out_features % 8 == 0 else None
            yield f"{parent_name}.{name}" if parent_name else name, parent, name, child, group


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every `nn.Linear` (the output layer too) in place; returns the model."""
    _check_mode(mode)
    for _, parent, name, linear, group in _targets(model, mode):
        setattr(parent, name, Int8Linear(linear) if group is None else Int4Linear(linear, group))
    model.config.chatglm_sft_quantization = mode
    return model.eval()


def quantized_state(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The state of `model` quantized to `mode`, for saving: float tensors as they are, quantized layers as int8
    weights and scales, or int4 codes (`weight_uint4`, portable) with their scales and zero points. The model is
    not changed."""
    _check_mode(mode)
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    for qualified, _, _, linear, group in _targets(model, mode):
        if group is None:
            layer = Int8Linear(linear)
            tensors = {"weight_int8": layer.weight_int8, "scale": layer.scale}
        else:
            q, scales_zeros = int4_codes(linear.weight, group)
            tensors = {"weight_uint4": portable_int4(q), "scales_and_zeros": scales_zeros}
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach()
        replaced[qualified] = tensors
    state = {}
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in replaced:
            continue
        state[name] = tensor
    for owner, tensors in replaced.items():
        state |= {f"{owner}.{leaf}": t.contiguous() for leaf, t in tensors.items()}
    return state


def prepare_quantized(model: nn.Module, mode: str) -> nn.Module:
    """Replace the linear layers of a model built on the meta device by empty quantized ones, so a state saved by
    `quantized_state` can be assigned into it; `finish_quantized` afterwards."""
    _check_mode(mode)
    for _, parent, name, linear, group in _targets(model, mode):
        shape, bias = (linear.out_features, linear.in_features), linear.bias is not None
        empty = (
            Int8Linear(shape=shape, bias=bias) if group is None else Int4Linear(None, group, shape=shape, bias=bias)
        )
        setattr(parent, name, empty)
    model.config.chatglm_sft_quantization = mode
    return model


def finish_quantized(model: nn.Module) -> nn.Module:
    """Arrange the int4 codes a `prepare_quantized` model was loaded with for its device's kernel, and give every
    quantized buffer storage of its own: tensors read from a safetensors file may sit at any offset of the mapped
    file, and the packed kernels' vector loads crash on such misaligned int8 data."""
    for module in model.modules():
        if isinstance(module, Int4Linear) and hasattr(module, "weight_uint4"):
            module.pack_loaded()
        if isinstance(module, (Int8Linear, Int4Linear)):
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.clone())
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the model holds in memory)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
