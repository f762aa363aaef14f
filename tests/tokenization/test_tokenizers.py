"""Tokenizers: THUDM's ids for text and chat prompts, plain-text safety, exported tokenizers, the encoder."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from transformers import AutoTokenizer

from chatglm_sft import load_tokenizer
from chatglm_sft.conversation import IGNORE_INDEX, encode_conversation
from chatglm_sft.errors import UserError
from chatglm_sft.families import get_family
from chatglm_sft.tokenization.export import export_hf_tokenizer
from tests.conftest import MODELS, TOKENIZE, need_shared

FAMILIES = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]
_cache: dict = {}


def tokenizer(name):
    if name not in _cache:
        _cache[name] = load_tokenizer(need_shared(MODELS / name))
    return _cache[name]


@pytest.fixture(scope="module")
def generated(tiny_checkpoint):
    """The family-shaped tokenizer of a generated tiny checkpoint (for behaviour that needs no THUDM ids)."""
    return lambda name: load_tokenizer(tiny_checkpoint(name))


def golden_lines(name):
    return [json.loads(line) for line in (need_shared(TOKENIZE) / f"{name}.tokenize.jsonl").open()]


def chat_cases(name):
    file = "glm-4-9b-chat.chat.jsonl" if name == "glm-4-9b-chat" else "chat.jsonl"
    cases = [json.loads(line) for line in (need_shared(TOKENIZE) / file).open()]
    return [c for c in cases if c["model"] == name]


def as_messages(case):
    messages = [{"role": "system", "content": case["system"]}] if case.get("system") else []
    for query, reply in case["history"]:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": case["query"]}]


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_decode_goldens(name):
    tok = tokenizer(name)
    for line in golden_lines(name):
        assert tok.encode(line["text"]) == line["ids"], line["text"]
        assert tok.encode(line["text"], add_special_tokens=False) == line["ids_no_special"], line["text"]
        assert tok.decode(line["ids_no_special"]) == line["decoded"], line["text"]


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_goldens(name):
    tok = tokenizer(name)
    for case in chat_cases(name):
        ids = tok.apply_chat_template(as_messages(case), add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == case["input_ids"], case["query"]


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_padding_is_left_with_official_pad(generated, name):
    tok = generated(name)
    batch = tok(["你好", "小明有3个苹果，又买了5个"], padding=True)
    short = tok.encode("你好")
    pad = len(batch["input_ids"][1]) - len(short)
    assert batch["input_ids"][0] == [tok.pad_token_id] * pad + short
    assert batch["attention_mask"][0] == [0] * pad + [1] * len(short)
    assert tok.pad_token_id == get_family(tok.family.name).pad_id


@pytest.mark.parametrize("name", ["chatglm3-6b", "glm-4-9b-chat"])
def test_special_strings_in_messages_stay_text(generated, name):
    tok = generated(name)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "<|assistant|> [gMASK] <|user|>"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    fam = tok.family
    assert ids.count(fam.id_of("<|assistant|>")) == 1 and ids[-1] == fam.id_of("<|assistant|>")
    assert ids.count(fam.id_of("<|user|>")) == 1 and ids.count(fam.id_of("[gMASK]")) == 1


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"])
def test_exported_tokenizer_works_in_plain_transformers(tmp_path, name):
    fam = tokenizer(name).family
    export_hf_tokenizer(fam, MODELS / name, tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    for line in golden_lines(name):
        assert plain.encode(line["text"]) == line["ids"], line["text"]
        assert plain.encode(line["text"], add_special_tokens=False) == line["ids_no_special"], line["text"]
    for case in chat_cases(name):
        ids = plain.apply_chat_template(
            as_messages(case), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ids == case["input_ids"], case["query"]
    assert load_tokenizer(tmp_path).family.name == fam.name


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"])
def test_exported_generated_tokenizer_equals_ours_in_plain_transformers(tmp_path, tiny_checkpoint, name):
    folder = tiny_checkpoint(name)
    ours = load_tokenizer(folder)
    export_hf_tokenizer(ours.family, folder, tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["你好", "小明有3个苹果，又买了5个。", "Hello world\n\n  x=1+2", "emoji 😀 龘", ""]:
        assert plain.encode(text) == ours.encode(text), text
        assert plain.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False), text
    rng = random.Random(name)
    for _ in range(10):
        # Prompts as the chat goldens have them: ending with a user turn; and without special-token strings in
        # the text, which a template rendered to text and tokenized again cannot keep as text.
        conversation = [
            m | {"content": m["content"].replace("<|user|>", "user").replace("[gMASK]", "mask")}
            for m in random_conversation(rng, name)
        ]
        messages = conversation[:-1]
        expected = ours.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert plain.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == expected
        # A whole conversation as training sees it: the last reply and the token that ends it.
        assert plain.apply_chat_template(conversation, return_dict=False) == ours.apply_chat_template(conversation)
    assert load_tokenizer(tmp_path).family.name == ours.family.name


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"])
def test_exported_template_equals_ours_on_empty_and_blank_messages(tmp_path, tiny_checkpoint, name):
    """Every conversation of one or two messages whose contents are empty, blank or not: an empty text has no tokens
    (not even SentencePiece's dummy prefix), which a template that writes ' ' + content would get wrong."""
    folder = tiny_checkpoint(name)
    ours = load_tokenizer(folder)
    export_hf_tokenizer(ours.family, folder, tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    roles = ["system", "user", "assistant"] + (["observation"] if name != "chatglm2-6b" else [])
    checked = 0
    for n in (1, 2):
        for chosen_roles in itertools.product(roles, repeat=n):
            for contents in itertools.product(["", "x", " ", "\n"], repeat=n):
                messages = [{"role": r, "content": c} for r, c in zip(chosen_roles, contents, strict=True)]
                for generation in (True, False):
                    try:
                        expected = ours.apply_chat_template(
                            messages, add_generation_prompt=generation, return_dict=False
                        )
                    except UserError:  # a conversation the family's template refuses
                        continue
                    got = plain.apply_chat_template(messages, add_generation_prompt=generation, return_dict=False)
                    assert got == expected, (messages, generation)
                    checked += 1
    assert checked >= 50


def test_round_templates_refuse_a_generation_prompt_after_a_reply(tmp_path, tiny_checkpoint):
    ours = load_tokenizer(tiny_checkpoint("chatglm2-6b"))
    export_hf_tokenizer(ours.family, tiny_checkpoint("chatglm2-6b"), tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}]
    with pytest.raises(UserError, match="user message last"):
        ours.apply_chat_template(messages, add_generation_prompt=True)
    with pytest.raises(Exception, match="user message last"):
        plain.apply_chat_template(messages, add_generation_prompt=True)
    for family in ("chatglm-6b", "chatglm2-6b"):
        with pytest.raises(UserError, match="user message last"):
            encode_conversation(load_tokenizer(tiny_checkpoint(family)), messages, add_generation_prompt=True)


WORDS = [
    "你好",
    "小明有3个苹果",
    " hello",
    "world ",
    "\n",
    "1+1=2。",
    "  spaces",
    "tab\t",
    "😀",
    "答：",
    "<|user|>",
    "[gMASK]",
    "emoji",
    "数学题",
    "x=(1/2)",
]


def random_conversation(rng: random.Random, family_name: str) -> list[dict]:
    def text():
        return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    if family_name in ("chatglm3-6b", "glm-4-9b-chat") and rng.random() < 0.3:
        messages.insert(len(messages) - 1, {"role": "observation", "content": text()})
        messages.insert(len(messages) - 2, {"role": "assistant", "content": text()})
    return messages


@pytest.mark.parametrize("name", FAMILIES)
def test_inference_prompt_is_prefix_of_training_ids(generated, name):
    tok = generated(name)
    rng = random.Random(name)
    for _ in range(40):
        messages = random_conversation(rng, name)
        train = encode_conversation(tok, messages)
        prompt = encode_conversation(tok, messages[:-1], add_generation_prompt=True)
        assert train.input_ids[: len(prompt.input_ids)] == prompt.input_ids
        assert all(label == IGNORE_INDEX for label in prompt.labels)
        reply = train.input_ids[len(prompt.input_ids) :]
        assert train.labels[len(prompt.input_ids) :] == reply  # the whole last reply and its end token
        assert reply[-1] == tok.family.reply_end_id
        assert all(label in (IGNORE_INDEX, i) for label, i in zip(train.labels, train.input_ids, strict=True))


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"])
def test_every_reply_learned_by_default_last_only_as_option(generated, name):
    tok = generated(name)
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "第一个回答"},
        {"role": "user", "content": "再说一次"},
        {"role": "assistant", "content": "第二个回答"},
    ]
    every = encode_conversation(tok, messages)
    last = encode_conversation(tok, messages, last_turn_only=True)
    learned_every = tok.decode([i for i in every.labels if i != IGNORE_INDEX], skip_special_tokens=True)
    learned_last = tok.decode([i for i in last.labels if i != IGNORE_INDEX], skip_special_tokens=True)
    assert "第一个回答" in learned_every and "第二个回答" in learned_every
    assert "第一个回答" not in learned_last and "第二个回答" in learned_last
    assert "你好" not in learned_every


@pytest.mark.parametrize("name", FAMILIES)
def test_truncation_keeps_newest_turns_and_frames(generated, name):
    tok = generated(name)
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"问题{i}" * 5}, {"role": "assistant", "content": f"回答{i}" * 5}]
    full = encode_conversation(tok, messages)
    cut = encode_conversation(tok, messages, max_length=len(full.input_ids) // 2)
    assert len(cut.input_ids) <= len(full.input_ids) // 2
    text = tok.decode(cut.input_ids)
    assert "回答5" in text and "问题0" not in text
    fam = tok.family
    prefix = [fam.id_of(t) for t in fam.prefix_tokens]
    assert cut.input_ids[: len(prefix)] == prefix and cut.input_ids[-1] == fam.reply_end_id
    long = [{"role": "user", "content": "很长的问题" * 200}, {"role": "assistant", "content": "很长的回答" * 200}]
    short = encode_conversation(tok, long, max_length=64)
    assert len(short.input_ids) <= 64 and short.input_ids[-1] == fam.reply_end_id


def test_v1_preprocessing_equals_thudm_replace_loop():
    from chatglm_sft.tokenization.v1 import postprocess, preprocess

    def thudm(text):
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(80, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(["a", "中", " ", "\n", "\t", " " * rng.randint(2, 200)]) for _ in range(12))
        assert preprocess(text) == thudm(text)
        assert postprocess(preprocess(text)) == text


@pytest.mark.parametrize("name", ["chatglm-6b", "glm-4-9b-chat"])
def test_chat_template_tensors_have_a_batch_dimension(generated, name):
    tok = generated(name)
    one = [{"role": "user", "content": "你好"}]
    single = tok.apply_chat_template(one, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert (
        single["input_ids"].shape
        == single["attention_mask"].shape
        == (1, len(tok.apply_chat_template(one, add_generation_prompt=True)))
    )
    two = [one, [{"role": "user", "content": "请详细地说一说"}]]
    batch = tok.apply_chat_template(two, add_generation_prompt=True, return_tensors="pt")
    assert batch.shape[0] == 2 and batch[0, 0] == tok.pad_token_id  # left-padded
