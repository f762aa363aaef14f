"""`chatglm-sft train --objective dpo|orpo|simpo` end to end on the tiny checkpoints: the acceptance calls in real
subprocesses, the rest through the same `train(config)` in this process (one import of torch, not one per run)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from datasets import load_from_disk

import chatglm_sft
from chatglm_sft.data.pairs import check_pairs, encode_pair
from chatglm_sft.errors import UserError
from chatglm_sft.options import OptionError
from chatglm_sft.train import preference
from chatglm_sft.train.config import load_config
from chatglm_sft.train.loop import train as run_training
from chatglm_sft.train.preference import METRICS
from tests.conftest import cli
from tests.preference.pairs_data import arithmetic_pairs, write_pairs


def train(model, data, out, *extra, precision: str | None = "fp32"):
    """The CLI in a subprocess (`precision` None: the default, `auto`)."""
    args = ("--model", str(model), "--data", str(data), "--output", str(out), *extra)
    args += ("--precision", precision) if precision else ()
    result = cli("train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_here(capsys, model, data, out, **options) -> str:
    """`train(config)` in this process; returns what it printed."""
    values = {"model": str(model), "data": str(data), "output": str(out), "precision": "fp32"} | options
    run_training(load_config(None, values, check_paths_exist=True))
    return capsys.readouterr().out


def train_log(out) -> list[dict]:
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.json", arithmetic_pairs(32))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm-6b"])
def test_dpo_lora_starts_at_ln2_and_learns_the_preference(tiny_checkpoint, tmp_path, pairs, family):
    out = tmp_path / "out"
    args = ("--objective", "dpo", "--method", "lora", "--max-steps", "40")
    # The acceptance call as written: the default precision, which is bf16 autocast on a CPU with AMX.
    result = train(tiny_checkpoint(family), pairs, out, *args, precision=None)
    assert "reference: the base model (the adapter disabled)" in result.stdout
    log = train_log(out)
    assert len(log) == 40 and all(set(METRICS) <= set(e) for e in log)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at the start
    assert log[-1]["rewards/margins"] > 0
    assert log[-1]["rewards/accuracies"] >= 0.9
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert any((out / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_losses_fall(tiny_checkpoint, tmp_path, pairs, objective):
    out = tmp_path / objective
    args = ("--objective", objective, "--max-steps", "16", "--learning-rate", "1e-3", "--batch-size", "8")
    result = train(tiny_checkpoint("chatglm2-6b"), pairs, out, *args)
    assert "reference" not in result.stdout  # neither uses one
    losses = [e["loss"] for e in train_log(out)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # (ORPO's is mostly the chosen NLL: its margins move slowly)


def test_ref_adapter_continues_the_sft_adapter_as_reference(tiny_checkpoint, tmp_path, pairs, capsys):
    """From an SFT adapter, the reference is base + that adapter: the first loss is ln 2 again (with the bare base
    as reference it is not), and training continues the adapter."""
    model = tiny_checkpoint("chatglm2-6b")
    sft_data = tmp_path / "sft.json"
    records = arithmetic_pairs(32)
    sft_data.write_text(json.dumps([{"instruction": r["instruction"], "output": r["chosen"]} for r in records]))
    sft = tmp_path / "sft"
    train_here(capsys, model, sft_data, sft, max_steps=4, learning_rate=1e-2, lora_dropout=0.0)
    out = tmp_path / "dpo"
    printed = train_here(capsys, model, pairs, out, objective="dpo", ref_adapter=str(sft), max_steps=2)
    assert f"the adapter {sft}" in printed
    first = train_log(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # the policy started from the SFT adapter, so its log-probabilities are the SFT model's, not the base's
    base = tmp_path / "base"
    train_here(capsys, model, pairs, base, objective="dpo", max_steps=1)
    assert abs(first["logps/chosen"] - train_log(base)[0]["logps/chosen"]) > 1e-2
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("method", "extra", "said"),
    [
        ("full", {"ref_model": "MODEL"}, "the model in"),
        ("freeze", {}, "computed once before training"),
        ("lora", {"precompute_ref": True}, "computed once before training"),
    ],
)
def test_references_all_start_at_ln2(tiny_checkpoint, tmp_path, pairs, capsys, method, extra, said):
    model = tiny_checkpoint("chatglm2-6b")
    extra = {k: str(model) if v == "MODEL" else v for k, v in extra.items()}
    out = tmp_path / method
    printed = train_here(capsys, model, pairs, out, objective="dpo", method=method, max_steps=1, **extra)
    assert said in printed
    assert train_log(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_eval_split_logs_held_out_rewards(tiny_checkpoint, tmp_path, pairs, capsys):
    out = tmp_path / "out"
    train_here(capsys, tiny_checkpoint("chatglm2-6b"), pairs, out, objective="simpo", max_steps=1, eval_split=0.25)
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [e for e in entries if "eval_loss" in e]
    assert evals and all(f"eval_{m}" in evals[-1] for m in METRICS)


@pytest.mark.parametrize(
    ("objective", "given", "expected"), [("simpo", None, 2.0), ("simpo", 0.5, 0.5), ("dpo", None, 0.1)]
)
def test_beta_defaults_to_the_objectives_own(tiny_checkpoint, tmp_path, pairs, capsys, objective, given, expected):
    """SimPO's β is its authors' 2.0 unless given, DPO's TRL's 0.1; the loss and rewards use it."""
    out = tmp_path / "out"
    options = {"objective": objective, "max_steps": 2} | ({"beta": given} if given else {})
    printed = train_here(capsys, tiny_checkpoint("chatglm2-6b"), pairs, out, **options)
    assert f"objective {objective} (β {expected:g})" in printed
    last = train_log(out)[-1]
    if objective == "simpo":  # rewards = β · mean log π (DPO's use the reference's log-probabilities, not logged)
        assert last["rewards/chosen"] == pytest.approx(expected * last["logps/chosen"], rel=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"objective": "dpo", "packing": True}, "--packing"),
        ({"objective": "orpo", "precompute_ref": True}, "--precompute-ref"),
        ({"objective": "sft", "ref_adapter": "."}, "--ref-adapter"),
        ({"objective": "dpo", "method": "full", "ref_adapter": "."}, "--ref-adapter"),
        ({"objective": "orpo", "beta": 0.5}, "--beta: --objective orpo has no β .*--orpo-lambda"),
        ({"objective": "sft", "beta": 0.5}, "--beta: --objective sft has no β"),
    ],
)
def test_refused_options_name_the_option(tiny_checkpoint, tmp_path, pairs, capsys, options, message):
    with pytest.raises(UserError, match=message):
        train_here(capsys, tiny_checkpoint("chatglm2-6b"), pairs, tmp_path / "o", **options)
    with pytest.raises(OptionError, match="--objective"):
        load_config(None, {"model": "m", "data": "d", "output": "o", "objective": "kto"})


def test_cli_refuses_pairs_with_packing_in_one_line(tiny_checkpoint, tmp_path, pairs):
    result = cli("train", "--model", str(tiny_checkpoint("chatglm2-6b")), "--data", str(pairs), "--output",
                 str(tmp_path / "o"), "--objective", "dpo", "--packing")  # fmt: skip
    assert result.returncode != 0
    assert "--packing" in result.stderr and "Traceback" not in result.stderr


def test_dpo_resume_continues_exactly(tiny_checkpoint, tmp_path, pairs, capsys):
    model = tiny_checkpoint("chatglm2-6b")
    whole = tmp_path / "whole"
    options = {"objective": "dpo", "max_steps": 4, "save_steps": 2, "batch_size": 2}
    train_here(capsys, model, pairs, whole, **options)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert "resuming from" in train_here(capsys, model, pairs, resumed, **options, resume="auto")
    expected, got = train_log(whole), train_log(resumed)
    assert [e["step"] for e in got] == [1, 2, 3, 4]
    for a, b in zip(expected[2:], got[2:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-6)


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_dpo_on_chatglm3_and_glm4_starts_at_ln2(tiny_checkpoint, tmp_path, capsys, family):
    """Conversational (TRL-shaped) pairs with a system prompt on the role-token templates."""
    records = arithmetic_pairs(8, shape="trl")
    for r in records:
        r["prompt"] = [{"role": "system", "content": "只回答算式和结果"}, *r["prompt"]]
    data = write_pairs(tmp_path / "pairs.json", records)
    out = tmp_path / "out"
    train_here(capsys, tiny_checkpoint(family), data, out, objective="dpo", max_steps=1)
    assert train_log(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_tokenized_pairs_are_cached_and_rebuilt_when_a_setting_changes(tiny_checkpoint, tmp_path, pairs, capsys):
    """A second run over the same output reads the encoded pairs back instead of encoding them again; another
    `max_length` gets entries of its own, whose ids are those of a fresh encoding."""
    model, out = tiny_checkpoint("chatglm2-6b"), tmp_path / "out"
    train_here(capsys, model, pairs, out, objective="dpo", max_steps=1)
    assert len(list((out / "cache").iterdir())) == 1

    def refuse(*_args):
        raise AssertionError("pairs encoded again although the cache holds them")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preference, "encode_pairs", refuse)
        train_here(capsys, model, pairs, out, objective="dpo", max_steps=1)
    # Short enough to cut some pairs (those it cuts to the same tokens are left out: not the point here).
    train_here(capsys, model, pairs, out, objective="dpo", max_steps=1, max_length=84)
    entries = sorted((out / "cache").iterdir())
    assert len(entries) == 2
    tokenizer = chatglm_sft.load_tokenizer(model)
    expected = [encode_pair(tokenizer, pair, 84) for _, pair in check_pairs(pairs, tokenizer.family).good]
    short = [e for e in map(load_from_disk, map(str, entries)) if max(map(len, e["chosen_ids"])) <= 84]
    assert any(len(p.chosen_ids) == 84 for p in expected)  # some were cut
    assert len(short) == 1 and list(short[0]["chosen_ids"]) == [p.chosen_ids for p in expected]
    assert list(short[0]["rejected_labels"]) == [p.rejected_labels for p in expected]


def test_pairs_cut_to_the_same_tokens_are_left_out(tiny_checkpoint, tmp_path, capsys):
    # Replies that differ only past --max-length would train as pairs with margin exactly 0: no signal, and a
    # wrong answer in `rewards/accuracies` on every step. They are left out, said and listed, not trained on.
    shared = "先把两个数相加，再检查一遍结果，" * 8
    records = arithmetic_pairs(6) + [{"instruction": "2+2=?", "chosen": shared + "4", "rejected": shared + "5"}]
    data = write_pairs(tmp_path / "pairs.json", records)
    options = {"objective": "dpo", "method": "lora", "max_steps": 1, "max_length": 128}
    said = train_here(capsys, tiny_checkpoint("chatglm2-6b"), data, tmp_path / "out", **options)
    assert "leaving out 1 pair(s) that --max-length 128 cuts to the same tokens" in said
    assert "6 pairs (0 held out)" in said
    (rejected,) = map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())
    assert rejected["line"] == 38 and "--max-length 128 cuts chosen and rejected" in rejected["reason"]
    assert rejected["record"]["chosen"] == shared + "4"
