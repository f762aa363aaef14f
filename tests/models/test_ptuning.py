"""P-Tuning v2: THUDM's checkpoints reproduce their outputs; our training writes the same layout; QLoRA's gate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import chatglm_sft
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from tests.conftest import DATA, TINY, cli, need_shared
from tests.models.test_glm_loading import expand_logits

PAIRS = [("chatglm-6b-tiny", "chatglm-6b-tiny-ptuning"), ("chatglm2-6b-tiny", "chatglm2-6b-tiny-ptuning")]


@pytest.mark.parametrize("base,ptuning", PAIRS)
def test_thudm_ptuning_checkpoints_match_reference(base, ptuning):
    folder = need_shared(TINY / ptuning)
    expected = load_file(folder / "expected.safetensors")
    expected["x_logits_at_cols"], expected["x_logits_logsumexp"], expected["x_logits_argmax"] = (
        expected["logits_at_cols"],
        expected["logits_logsumexp"],
        expected["logits_argmax"],
    )
    model = chatglm_sft.load_model(TINY / base, dtype=torch.float32, adapter=folder)
    with torch.no_grad():
        diff, lse, argmax = expand_logits(expected, "x", model(expected["input_ids"]).logits)
        out = model.generate(expected["greedy_prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert diff <= 1e-4 and lse <= 1e-4 and argmax
    assert out[0, 12:].tolist() == expected["greedy_tokens"].tolist()


@pytest.mark.parametrize("base,ptuning", PAIRS)
def test_prefix_in_batches_and_with_the_cache(base, ptuning):
    folder = need_shared(TINY / ptuning)
    model = chatglm_sft.load_model(TINY / base, dtype=torch.float32, adapter=folder)
    engine = Engine(model, chatglm_sft.load_tokenizer(TINY / base))
    prompts = [engine.tokenizer.encode(t) for t in ("你好", "请写一首很长的诗，关于春天和秋天的变化")]
    params = SamplingParams(max_new_tokens=6)
    together = engine.generate(prompts, params)
    for prompt, result in zip(prompts, together, strict=True):
        assert engine.generate([prompt], params)[0].token_ids == result.token_ids
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("base", ["chatglm2-6b-tiny", "chatglm-6b-tiny"])
def test_train_ptuning_and_load_result(tmp_path, base):
    model = need_shared(TINY / base)
    out = tmp_path / "pt"
    result = cli(
        "train",
        "--model",
        str(model),
        "--data",
        str(DATA / "alpaca" / "alpaca_zh_demo.json"),
        "--max-samples",
        "16",
        "--batch-size",
        "2",
        "--output",
        str(out),
        "--method",
        "ptuning",
        "--pre-seq-len",
        "4",
        "--max-steps",
        "4",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == 4
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert saved and all(k.startswith("transformer.prefix_encoder.") for k in saved)
    tuned = chatglm_sft.load_model(model, dtype=torch.float32, adapter=out)
    plain = chatglm_sft.load_model(model, dtype=torch.float32)
    ids = torch.tensor([chatglm_sft.load_tokenizer(model).encode("你好")])
    with torch.no_grad():
        assert (tuned(ids).logits - plain(ids).logits).abs().max() > 1e-4


def test_qlora_without_cuda_is_a_clear_error(tmp_path):
    model = need_shared(TINY / "chatglm2-6b-tiny")
    result = cli(
        "train",
        "--model",
        str(model),
        "--data",
        str(DATA / "alpaca" / "alpaca_zh_demo.json"),
        "--output",
        str(tmp_path / "q"),
        "--method",
        "qlora",
    )
    if result.returncode == 0:
        pytest.skip("this machine has CUDA and bitsandbytes: QLoRA ran")
    assert "Traceback" not in result.stderr and "CUDA" in result.stderr and "bitsandbytes" in result.stderr
    assert not (tmp_path / "q").exists()  # stopped before loading or writing anything
