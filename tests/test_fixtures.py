"""The generated tiny checkpoints behave like real downloads: detected, loaded, tokenizing like their family."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch

import chatglm_sft
from chatglm_sft.families import detect_family, get_family
from chatglm_sft.models.synthetic import PUBLISHED
from tests.conftest import alpaca_records

FAMILIES = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]
TEXTS = ["Hello world, 2 + 3 = 5", "小明有3个苹果。\\n第二行\\t有  两个空格", "emoji 😀 and 龘 by bytes"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_as_its_family(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    fam = get_family(family)
    assert detect_family(folder) is fam
    model = chatglm_sft.load_model(folder)
    assert model.config.vocab_size == PUBLISHED[fam.name].vocab
    ids = torch.tensor(
        [[fam.id_of(t) for t in fam.prefix_tokens] + [10, 11, 12] + [fam.id_of(t) for t in fam.suffix_tokens]]
    )
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert tiny_checkpoint(family) == folder  # built once per session


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_round_trips_and_prompts_like_its_family(tiny_checkpoint, family):
    fam = get_family(family)
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    prefix = [fam.id_of(t) for t in fam.prefix_tokens]
    suffix = [fam.id_of(t) for t in fam.suffix_tokens]
    for text in [t.replace("\\n", "\n").replace("\\t", "\t") for t in TEXTS]:
        ids = tok.encode(text)
        assert ids[: len(prefix)] == prefix and ids[len(ids) - len(suffix) :] == suffix
        assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert prompt[: len(prefix)] == prefix and prompt[len(prompt) - len(suffix) :] == suffix
    assert len(prompt) > len(prefix) + len(suffix)
    assert tok.pad_token_id == fam.pad_id


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm3-6b"])
def test_sentencepiece_layout_puts_specials_at_official_ids(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    assert spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size() == 64789
    tok = chatglm_sft.load_tokenizer(folder)
    assert len(tok) == max(get_family(family).special_tokens.values()) + 1


def test_chatglm_v1_layout_and_text_preprocessing(tiny_checkpoint):
    folder = tiny_checkpoint("chatglm-6b")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "ice_text.model"))
    assert sp.get_piece_size() == 130344
    official = {"<pad>": 3, "<n>": 4, "▁": 5, "[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005}
    assert {piece: sp.piece_to_id(piece) for piece in official} == official
    tok = chatglm_sft.load_tokenizer(folder)
    # THUDM's pre-processing: a newline is <n>, a run of 3 spaces <|blank_3|>, a tab <|tab|>.
    assert tok.encode("a\nb   c\td", add_special_tokens=False) == sp.encode("a<n>b<|blank_3|>c<|tab|>d")
    assert {sp.piece_to_id("<n>"), sp.piece_to_id("<|blank_3|>"), sp.piece_to_id("<|tab|>")} <= set(
        tok.encode("a\nb   c\td")
    )


def test_glm4_ranks_file_puts_specials_at_official_ids(tiny_checkpoint):
    folder = tiny_checkpoint("glm-4-9b-chat")
    ranks = (folder / "tokenizer.model").read_text().splitlines()
    assert len(ranks) == 151329 and ranks[-1].endswith(" 151328")
    tok = chatglm_sft.load_tokenizer(folder)
    # GLM-4's tokenizer turns special-token strings in text into their ids, as the official one does.
    assert tok.encode("<|user|>hi", add_special_tokens=False)[0] == 151336
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLM4Tokenizer"


def test_shape_options_and_chatglm3_without_tokenizer_config(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("chatglm2-6b", kv_groups=1)
    config = json.loads((folder / "config.json").read_text())
    assert config["multi_query_group_num"] == 1 and folder != tiny_checkpoint("chatglm2-6b")
    assert chatglm_sft.load_model(folder).config.num_key_value_heads == 1
    # Without its tokenizer config a ChatGLM3 folder is still told apart by its published seq_length.
    (tmp_path / "config.json").write_text((tiny_checkpoint("chatglm3-6b") / "config.json").read_text())
    assert detect_family(tmp_path).name == "chatglm3-6b"


def test_glm4_config_has_its_published_rope_ratio_and_eps(tiny_checkpoint):
    config = json.loads((tiny_checkpoint("glm-4-9b-chat") / "config.json").read_text())
    assert config["rope_ratio"] == 500 and config["layernorm_epsilon"] == 1.5625e-7


def test_tiny_alpaca_is_alpaca_shaped(tiny_alpaca):
    records = json.loads(tiny_alpaca.read_text(encoding="utf-8"))
    assert records == alpaca_records() and len(records) == 40
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in records)
    assert any(r["input"] for r in records) and any("答" in r["output"] for r in records)
