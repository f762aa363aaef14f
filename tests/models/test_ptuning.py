"""P-Tuning v2: THUDM's checkpoints reproduce their outputs; our training writes the same layout, moves the prefix
and lowers the loss; QLoRA's gate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.eval.loss import answer_loss
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from tests.conftest import TINY, alpaca_records, cli, need_shared
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


def write_records(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def answer_examples(tok, records):
    return [
        (enc.input_ids, enc.labels)
        for enc in (
            encode_conversation(
                tok, [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            )
            for r in records
        )
    ]


def prefix_tensors(folder):
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


@pytest.fixture(scope="module")
def trained_ptuning(tiny_checkpoint, tmp_path_factory):
    """family -> (base folder, records, prefix after 1 step at a negligible rate, prefix trained for 12 steps)."""
    done = {}

    def get(family):
        if family not in done:
            base = tiny_checkpoint(family)
            tmp = tmp_path_factory.mktemp("ptuning")
            records = [r for r in alpaca_records() if not r["input"]][:8]
            data = write_records(tmp / "train.json", records)
            common = ["--model", str(base), "--data", str(data), "--method", "ptuning", "--pre-seq-len", "4"]
            common += ["--batch-size", "4", "--precision", "fp32", "--lr-scheduler", "constant"]
            untouched = cli(
                "train", *common, "--output", str(tmp / "p0"), "--max-steps", "1", "--learning-rate", "1e-12"
            )
            assert untouched.returncode == 0, untouched.stderr
            trained = cli(
                "train", *common, "--output", str(tmp / "pt"), "--max-steps", "12", "--learning-rate", "3e-1"
            )
            assert trained.returncode == 0, trained.stderr
            done[family] = base, records, tmp / "p0", tmp / "pt"
        return done[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
def test_train_ptuning_moves_the_prefix_and_lowers_the_loss(trained_ptuning, family):
    base, records, untouched, out = trained_ptuning(family)
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == 4
    saved = prefix_tensors(out)
    assert saved and all(k.startswith("transformer.prefix_encoder.") for k in saved)
    start = prefix_tensors(untouched)
    assert saved.keys() == start.keys()
    moved = max((saved[k].float() - start[k].float()).abs().max().item() for k in saved)
    assert moved > 1e-2, moved
    tok = chatglm_sft.load_tokenizer(base)
    examples = answer_examples(tok, records)
    losses = {}
    for name, adapter in (("before", untouched), ("after", out)):
        model = chatglm_sft.load_model(base, dtype=torch.float32, adapter=adapter)
        losses[name] = answer_loss(model, examples, tok.family.pad_id)["loss"]
    assert losses["after"] < losses["before"] - 0.5, losses


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
def test_prefix_in_batches_and_with_the_cache(trained_ptuning, family):
    base, _, _, adapter = trained_ptuning(family)
    model = chatglm_sft.load_model(base, dtype=torch.float32, adapter=adapter)
    engine = Engine(model, chatglm_sft.load_tokenizer(base))
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


def test_qlora_without_cuda_is_a_clear_error(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tiny_checkpoint("chatglm2-6b")
    result = cli(
        "train",
        "--model",
        str(model),
        "--data",
        str(tiny_alpaca),
        "--output",
        str(tmp_path / "q"),
        "--method",
        "qlora",
    )
    if result.returncode == 0:
        pytest.skip("this machine has CUDA and bitsandbytes: QLoRA ran")
    assert "Traceback" not in result.stderr and "CUDA" in result.stderr and "bitsandbytes" in result.stderr
    assert not (tmp_path / "q").exists()  # stopped before loading or writing anything
