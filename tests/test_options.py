"""Every bad option value is one clear line before anything loads: exit 2, the option named, no traceback."""

from __future__ import annotations

import dataclasses
import time

import pytest

from chatglm_sft import options
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.options import OptionError, option
from chatglm_sft.train.config import TrainConfig, load_config
from tests.conftest import cli

BAD = [
    ("train", ["--logging-steps", "0"], "--logging-steps"),
    ("train", ["--max-steps", "0"], "--max-steps"),
    ("train", ["--batch-size", "-2"], "--batch-size"),
    ("train", ["--eval-split", "1"], "--eval-split"),
    ("train", ["--learning-rate", "abc"], "--learning-rate"),
    ("train", ["--save-steps", "0"], "--save-steps"),
    ("train", ["--method", "lorra"], "--method"),
    ("train", ["--lora-dropout", "1.5"], "--lora-dropout"),
    ("train", ["--config", "absent.yaml"], "--config"),
    ("train", ["--data", "absent.jsonl"], "--data"),
    ("predict", ["--batch-size", "0"], "--batch-size"),
    ("predict", ["--batch-size", "-1"], "--batch-size"),
    ("predict", ["--top-p", "0"], "--top-p"),
    ("predict", ["--temperature", "-0.5"], "--temperature"),
    ("predict", ["--max-new-tokens", "2.5"], "--max-new-tokens"),
    ("predict", ["--repetition-penalty", "0"], "--repetition-penalty"),
    ("predict", ["--adapter", "absent-adapter"], "--adapter"),
    ("eval", ["--top-k", "-1"], "--top-k"),
    ("eval", ["--predictions", "absent.jsonl"], "--predictions"),
    ("serve", ["--port", "70000"], "--port"),
    ("serve", ["--max-batch-size", "0"], "--max-batch-size"),
    ("chat", ["--seed", "-3"], "--seed"),
    ("chat", ["--quantize", "int3"], "--quantize"),
    ("export", ["--format", "gguf"], "--format"),
    ("export", ["--model", "absent-model"], "--model"),
]


def valid_args(command: str, folder) -> list[str]:
    model, data, out = str(folder / "model"), str(folder / "data.jsonl"), str(folder / "out")
    return {
        "train": ["--model", model, "--data", data, "--output", out],
        "predict": ["--model", model, "--data", data, "--output", out],
        "eval": ["--task", "generation", "--model", model, "--data", data, "--output", out + ".json"],
        "serve": ["--model", model],
        "chat": ["--model", model],
        "export": ["--model", model, "--output", out],
    }[command]


@pytest.mark.parametrize(("command", "bad", "named"), BAD, ids=[f"{c} {' '.join(b)}" for c, b, _ in BAD])
def test_bad_value_is_one_line_naming_the_option(tmp_path, command, bad, named):
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    start = time.monotonic()
    result = cli(command, *valid_args(command, tmp_path), *bad, cwd=tmp_path, timeout=60)
    assert time.monotonic() - start < 15
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_debug_is_accepted_after_the_command(tmp_path):
    result = cli("info", "--model", str(tmp_path / "absent"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "OptionError" in result.stderr


def test_recipe_values_are_checked_like_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\noutput: o\nlogging_steps: 0\n")
    with pytest.raises(OptionError, match=r"--logging-steps 0: out of range, must be >= 1"):
        load_config(recipe, {})
    recipe.write_text("data: d\noutput: o\n")
    with pytest.raises(OptionError, match="--model is required"):
        load_config(recipe, {})
    recipe.write_text("model: m\ndata: d\noutput: o\nbatch_size: [4]\n")
    with pytest.raises(OptionError, match="--batch-size"):
        load_config(recipe, {})
    recipe.write_text("model: [m\n")
    with pytest.raises(OptionError, match="--config .*not valid YAML"):
        load_config(recipe, {})


def test_sampling_params_check_their_ranges_for_every_caller():
    assert SamplingParams(temperature=0, top_p=1, top_k=0, seed=0).greedy
    for bad in ({"top_p": 0.0}, {"top_p": 1.01}, {"temperature": -1e-9}, {"max_new_tokens": 0}, {"seed": 2**64}):
        with pytest.raises(OptionError, match="--" + next(iter(bad)).replace("_", "-")):
            SamplingParams(**bad)
    with pytest.raises(OptionError, match="--top-k"):
        SamplingParams(top_k="5")


def test_adding_an_option_is_one_field():
    @dataclasses.dataclass
    class Extra:
        width: int = option(3, ge=1, le=9)
        """How wide."""

    import argparse

    parser = argparse.ArgumentParser()
    options.add_options(parser, Extra)
    assert "How wide. (default: 3; >= 1 and <= 9)" in " ".join(parser.format_help().split())
    assert options.build(Extra, options.given(Extra, parser.parse_args(["--width", "4"]))).width == 4
    with pytest.raises(OptionError, match=r"--width 10: out of range, must be >= 1 and <= 9"):
        options.build(Extra, {"width": "10"})
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(options.field_docs(TrainConfig))


def test_model_config_missing_a_key_is_one_line(tmp_path, tiny_checkpoint):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("chatglm2-6b"), model)
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi"}\n')
    result = cli(
        "predict", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o")
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"chatglm-sft: error: {model / 'config.json'}: missing key 'hidden_size' (not a complete chatglm2-6b config)"
    ]
