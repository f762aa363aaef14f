"""Float32 activations for quantized models on CPUs without bf16 arithmetic (`chatglm_sft.models.cpu_activations`):
what changes in the model, that its logits stay those of bf16 activations up to bf16's rounding, and when nothing
changes."""

from __future__ import annotations

import pytest
import torch

import chatglm_sft
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.models import cpu_activations
from chatglm_sft.models.quantize import Int4Linear, Int8Linear

QUANTIZED = (Int8Linear, Int4Linear)


def decoder_inputs(model, ids: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """The dtype of what the first block after the embedding receives, and the last position's logits."""
    seen = []

    def record(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()
    finally:
        handle.remove()
    return seen[0].dtype, logits


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm2-6b", "glm-4-9b-chat"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_bf16_model_computes_in_float32(tiny_checkpoint, monkeypatch, family, mode):
    monkeypatch.setattr(cpu_activations, "bf16_arithmetic", lambda: False)
    model = chatglm_sft.load_model(tiny_checkpoint(family), dtype=torch.bfloat16, quantize=mode)
    ids = torch.randint(100, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    dtype, bf16_logits = decoder_inputs(model, ids)
    assert dtype == torch.bfloat16
    engine = Engine(model, tokenizer=None)  # the engine applies it
    embedding = model.get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16  # the table stays as it is; its rows are cast as read
    for module in model.modules():
        if module is embedding or isinstance(module, QUANTIZED):
            continue
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            assert not p.is_floating_point() or p.dtype == torch.float32, (module, p.dtype)
    assert any(m.scales_and_zeros.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, Int4Linear)) or (
        mode == "int8"
    )
    dtype, float32_logits = decoder_inputs(model, ids)
    assert dtype == torch.float32
    # The same weights: only the activations' rounding differs (bf16 keeps 8 bits of mantissa).
    error = ((float32_logits - bf16_logits).norm() / bf16_logits.norm()).item()
    assert error < 0.05, error
    assert not cpu_activations.use_float32_activations(model)  # once only
    prompts, params = [[5, 100, 200, 300, 7], [9, 400, 8]], SamplingParams(max_new_tokens=6)
    batch = torch.stack(list(engine.decode_steps(prompts, params)), dim=1)
    for row, prompt in enumerate(prompts):
        alone = torch.stack(list(engine.decode_steps([prompt], params)), dim=1)
        assert torch.equal(batch[row], alone[0])


def test_nothing_changes_where_bf16_is_native_or_nothing_is_quantized(tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint("chatglm2-6b")
    monkeypatch.setattr(cpu_activations, "bf16_arithmetic", lambda: True)
    quantized = chatglm_sft.load_model(folder, dtype=torch.bfloat16, quantize="int4")
    assert not cpu_activations.use_float32_activations(quantized)
    monkeypatch.setattr(cpu_activations, "bf16_arithmetic", lambda: False)
    plain = chatglm_sft.load_model(folder, dtype=torch.bfloat16)
    assert not cpu_activations.use_float32_activations(plain)
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())
