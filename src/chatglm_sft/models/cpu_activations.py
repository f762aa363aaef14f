"""Float32 activations for a quantized model on a CPU without bf16 arithmetic.

A quantized model keeps its few unquantized weights (the embedding table, norms, LoRA adapters) in bf16, so what
flows between its quantized layers is bf16. On a CPU without bf16 instructions (no AVX512-BF16 or AMX, e.g. the
2-core AVX2 AMD EPYC host of docs/benchmarks.md) every bf16 operation converts to float32 and back: attention over one
token ran at 0.36 ms a layer in bf16 against 0.07 ms in float32, and a ChatGLM2-shaped int4 decode step spent ~1 ms
of its ~35 in PyTorch operations that float32 does not need. The quantized layers compute in float32 either way (our
CPU kernels take float32 rows), so the model's weights are what they were; only the activations gain precision.
"""

from __future__ import annotations

import torch
from torch import nn

from chatglm_sft.models.cpu_kernels import bf16_arithmetic
from chatglm_sft.models.quantize import Int4Linear, Int8Linear


def use_float32_activations(model: nn.Module) -> bool:
    """On a CPU without bf16 arithmetic, make a quantized model compute its activations in float32, in place: its
    unquantized floating-point weights become float32, except the embedding table (the largest of them; one row is
    read a token), whose rows are cast as they are read. P-Tuning models are left as they are (their prefix takes the
    embedding table's dtype). Returns whether the model changed."""
    config = model.config
    if getattr(config, "chatglm_sft_quantization", None) is None or getattr(config, "pre_seq_len", None):
        return False
    embedding = model.get_input_embeddings()
    if embedding.weight.device.type != "cpu" or embedding.weight.dtype == torch.float32 or bf16_arithmetic():
        return False
    if _rows_in_float32 in embedding._forward_hooks.values():
        return False  # done already (another engine over the same model)
    for module in model.modules():
        if module is embedding or isinstance(module, (Int8Linear, Int4Linear)):
            continue  # the quantized layers' scales stay as their PyTorch fallback kernels want them
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.float()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.float())  # stays a buffer, persistent or not as it was
    embedding.register_forward_hook(_rows_in_float32)
    return True


def _rows_in_float32(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()
