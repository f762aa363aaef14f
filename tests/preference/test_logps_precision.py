"""Reply log-probabilities under bf16 autocast: the output layer computes in float32 when its weight is float32, so
DPO's small margins are not lost to bf16 rounding of the logits (which hid them on a tiny ChatGLM-6B)."""

from __future__ import annotations

import pytest
import torch

import chatglm_sft
from chatglm_sft.data.pairs import Pair, encode_pair
from chatglm_sft.train.preference import pair_batch, sequence_logps

PAIRS = [
    Pair([{"role": "user", "content": "3+4等于多少？"}], "3+4=7，答：7", "3+4=8，答：8"),
    Pair([{"role": "user", "content": "Copy: the cat sat"}], "the cat sat", "the dog"),
]


def head_outputs(model, batch, autocast):
    """The output layer's outputs during `sequence_logps`, and the sums it returns."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        sums, _ = sequence_logps(model, batch, autocast)
    finally:
        hook.remove()
    return seen, sums


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm2-6b"])
def test_output_layer_is_float32_under_bf16_autocast(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    model = chatglm_sft.load_model(folder, dtype="float32").eval()
    tokenizer = chatglm_sft.load_tokenizer(folder)
    batch = pair_batch([encode_pair(tokenizer, p, 256) for p in PAIRS], tokenizer.family.pad_id)
    head = model.get_output_embeddings()
    with torch.no_grad():
        seen, sums = head_outputs(model, batch, torch.bfloat16)
        exact, _ = sequence_logps(model, batch, None)
        # The same body in bf16 with a bf16 output layer: what the float32 layer is there to avoid.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden_logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert [out.dtype for out in seen] == [torch.float32]
    assert "forward" not in head.__dict__  # the layer is itself again afterwards
    assert hidden_logits.dtype == torch.bfloat16  # outside `sequence_logps` autocast applies as usual
    assert torch.isfinite(sums).all() and sums.shape == exact.shape


def test_half_precision_output_layer_is_left_alone(tiny_checkpoint):
    """A bf16 weight is not copied to float32 on every step: the layer runs as autocast has it."""
    folder = tiny_checkpoint("chatglm2-6b")
    model = chatglm_sft.load_model(folder, dtype="bfloat16").eval()
    tokenizer = chatglm_sft.load_tokenizer(folder)
    batch = pair_batch([encode_pair(tokenizer, p, 256) for p in PAIRS], tokenizer.family.pad_id)
    with torch.no_grad():
        seen, _ = head_outputs(model, batch, torch.bfloat16)
    assert [out.dtype for out in seen] == [torch.bfloat16]
