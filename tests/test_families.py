"""The family registry classifies THUDM's folders from their configs."""

from __future__ import annotations

import json

import pytest

from chatglm_sft.errors import UserError
from chatglm_sft.families import FAMILIES, detect_family
from tests.conftest import MODELS, TINY, need_shared


@pytest.mark.parametrize(
    "folder,family",
    [
        ("chatglm-6b", "chatglm-6b"),
        ("chatglm2-6b", "chatglm2-6b"),
        ("chatglm3-6b", "chatglm3-6b"),
        ("glm-4-9b-chat", "glm-4"),
    ],
)
def test_real_folders(folder, family):
    assert detect_family(need_shared(MODELS / folder)).name == family


@pytest.mark.parametrize(
    "folder,family",
    [("chatglm-6b-tiny", "chatglm-6b"), ("chatglm2-6b-tiny", "chatglm2-6b"), ("glm-4-9b-chat-tiny", "glm-4")],
)
def test_tiny_reference_folders(folder, family):
    assert detect_family(need_shared(TINY / folder)).name == family


@pytest.mark.parametrize(
    "folder,family",
    [
        ("chatglm-6b", "chatglm-6b"),
        ("chatglm2-6b", "chatglm2-6b"),
        ("chatglm3-6b", "chatglm3-6b"),
        ("glm-4-9b-chat", "glm-4"),
    ],
)
def test_generated_folders(tiny_checkpoint, folder, family):
    assert detect_family(tiny_checkpoint(folder)).name == family


def test_chatglm3_without_tokenizer_config_by_seq_length(tmp_path, tiny_checkpoint):
    config = json.loads((tiny_checkpoint("chatglm3-6b") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert detect_family(tmp_path).name == "chatglm3-6b"
    config["seq_length"] = 32768
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert detect_family(tmp_path).name == "chatglm2-6b"
    assert detect_family(tmp_path, "chatglm3-6b").name == "chatglm3-6b"


def test_unrecognised_folder_asks_for_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    with pytest.raises(UserError, match="--family"):
        detect_family(tmp_path)


def test_records_are_consistent():
    for fam in FAMILIES.values():
        assert fam.eos_id in fam.stop_ids
        for name in (*fam.prefix_tokens, *fam.suffix_tokens, fam.eos_token, *fam.stop_tokens):
            assert name in fam.special_tokens
