"""`answer_loss` over padded batches equals the token-weighted mean of the model's own per-example losses."""

from __future__ import annotations

import pytest
import torch

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.eval.loss import answer_loss


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b", "glm-4-9b-chat"])
def test_batched_answer_loss_equals_per_example_losses(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    model = chatglm_sft.load_model(folder, dtype=torch.float32)
    tok = chatglm_sft.load_tokenizer(folder)
    pairs = [("你好", "你好！"), ("1+1等于几？", "等于2。"), ("写一句诗", "床前明月光，疑是地上霜。"), ("x", "y")]
    examples = []
    for q, a in pairs:
        enc = encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        examples.append((enc.input_ids, enc.labels))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            n = sum(1 for y in labels[1:] if y != -100)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total, tokens = total + out.loss.item() * n, tokens + n
    result = answer_loss(model, examples, tok.family.pad_id, batch_size=3)
    assert result["tokens"] == tokens and result["total"] == len(examples)
    assert abs(result["loss"] - total / tokens) <= 1e-5 * total / tokens
