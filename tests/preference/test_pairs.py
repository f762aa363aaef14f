"""Pair records: the three shapes read alike, validation names file:line, encoding learns only the replies and
truncates chosen and rejected the same way."""

from __future__ import annotations

import json

import pytest

import chatglm_sft
from chatglm_sft.conversation import IGNORE_INDEX, encode_conversation
from chatglm_sft.data.formats import RecordError
from chatglm_sft.data.pairs import check_pairs, encode_pair, is_pair_file, to_pair
from tests.conftest import cli
from tests.preference.pairs_data import arithmetic_pairs, write_pairs


def test_three_shapes_give_the_same_pairs():
    shapes = [arithmetic_pairs(5, shape=s) for s in ("alpaca", "sharegpt", "trl")]
    for alpaca, sharegpt, trl in zip(*shapes, strict=True):
        assert to_pair(alpaca) == to_pair(sharegpt) == to_pair(trl)
    implicit = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    }
    pair = to_pair(implicit)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([{"role": "user", "content": "q"}], "a", "b")


def test_history_and_system_reach_the_prompt():
    pair = to_pair(
        {"system": "be brief", "history": [["hi", "hello"]], "instruction": "2+2?", "chosen": "4", "rejected": "5"}
    )
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]


def test_messages_in_either_key_style_are_read():
    record = {"instruction": "q", "chosen": {"from": "gpt", "content": "a"}, "rejected": {"role": "gpt", "value": "b"}}
    pair = to_pair(record)
    assert (pair.chosen, pair.rejected) == ("a", "b")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"instruction": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"instruction": "q", "chosen": "a", "rejected": "a"}, "identical"),
        ({"instruction": "q", "chosen": 3, "rejected": "a"}, "'chosen' must be a string"),
        ({"instruction": "q", "chosen": " ", "rejected": "a"}, "'chosen' is empty"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "user"),
        (
            {"instruction": "q", "chosen": ["a"], "rejected": "b"},
            "'chosen' must be a string .* a list holding a string",
        ),
        ({"instruction": "q", "chosen": True, "rejected": "b"}, "'chosen' must be a string .* not a boolean"),
        ({"instruction": "q", "chosen": "a", "rejected": {"from": "gpt"}}, "'rejected': the message's 'value'"),
        ({"instruction": "q", "chosen": {"text": "a"}, "rejected": "b"}, "'chosen' must be an assistant message"),
        ({"chosen": ["a", "b"], "rejected": "c"}, r"field 'chosen': chosen\[0\] is not an object"),
        ({"instruction": "q", "chosen": "a\n", "rejected": " a"}, "differ only in leading or trailing whitespace"),
    ],
)
def test_bad_pairs_are_refused(record, reason):
    with pytest.raises(RecordError, match=reason):
        to_pair(record)


def test_data_check_names_each_bad_pair(tmp_path):
    lines = [
        {"instruction": "1+1?", "chosen": "2"},
        {"instruction": "2+2?", "chosen": "4", "rejected": "5"},
        {"instruction": "3+3?", "chosen": "6", "rejected": "6"},
        {"instruction": "4+4?", "chosen": 8, "rejected": "9"},
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert is_pair_file(path)
    result = cli("data", "check", "--data", str(path))
    assert result.returncode == 1, result.stderr
    for line, reason in [(1, "missing field 'rejected'"), (3, "identical"), (4, "'chosen'"), (5, "different prompts")]:
        assert f"{path}:{line}: " in result.stdout and reason in result.stdout
    assert f"{path}:2:" not in result.stdout
    good = write_pairs(tmp_path / "good.json", arithmetic_pairs(4))
    assert cli("data", "check", "--data", str(good)).returncode == 0


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"])
def test_pair_encoding_learns_only_the_reply(tiny_checkpoint, family):
    tokenizer = chatglm_sft.load_tokenizer(tiny_checkpoint(family), family=family)
    record = {
        "system": "简短回答" if family in ("chatglm3-6b", "glm-4-9b-chat") else "",
        "history": [["你好", "你好！"]],
        "instruction": "3+4=?",
        "chosen": "7",
        "rejected": "8，不对",
    }
    pair = to_pair(record)
    encoded = encode_pair(tokenizer, pair, 512)
    for reply, ids, labels in (
        (pair.chosen, encoded.chosen_ids, encoded.chosen_labels),
        (pair.rejected, encoded.rejected_ids, encoded.rejected_labels),
    ):
        messages = [*pair.prompt, {"role": "assistant", "content": reply}]
        expected = encode_conversation(tokenizer, messages, last_turn_only=True)
        assert ids == expected.input_ids and labels == expected.labels  # the one encoder, last reply only
        prompt = encode_conversation(tokenizer, pair.prompt, add_generation_prompt=True).input_ids
        assert ids[: len(prompt)] == prompt  # the inference prompt, then the reply
        assert all(y == IGNORE_INDEX for y in labels[: len(prompt)])
        assert any(y != IGNORE_INDEX for y in labels[len(prompt) :])


def test_truncation_cuts_chosen_and_rejected_alike(tiny_checkpoint):
    tokenizer = chatglm_sft.load_tokenizer(tiny_checkpoint("chatglm2-6b"), family="chatglm2-6b")
    long_history = [[f"问题{i} " * 10, f"回答{i} " * 10] for i in range(6)]
    pair = to_pair(
        {"history": long_history, "instruction": "最后的问题", "chosen": "好的 " * 40, "rejected": "不好 " * 5}
    )
    encoded = encode_pair(tokenizer, pair, 160)
    assert len(encoded.chosen_ids) <= 160 and len(encoded.rejected_ids) <= 160

    def prompt_part(ids, labels):
        first = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        return ids[:first]

    # the same (most recent) prompt for both, and each reply keeps its start
    chosen_prompt = prompt_part(encoded.chosen_ids, encoded.chosen_labels)
    assert chosen_prompt == prompt_part(encoded.rejected_ids, encoded.rejected_labels)
    assert "最后的问题" in tokenizer.decode(chosen_prompt)
    assert "问题0" not in tokenizer.decode(chosen_prompt)
    reply = [y for y in encoded.chosen_labels if y != IGNORE_INDEX]
    assert tokenizer.decode(reply).strip().startswith("好的")


def test_check_pairs_with_a_family_renders_both_sides(tiny_checkpoint, tmp_path):
    path = write_pairs(tmp_path / "p.json", arithmetic_pairs(3, shape="trl"))
    family = chatglm_sft.families.get_family("chatglm3-6b")
    report = check_pairs(path, family)
    assert len(report.good) == 3 and not report.bad


def test_data_check_with_a_model_lists_pairs_that_max_length_cuts_alike(tiny_checkpoint, tmp_path):
    shared = "先把两个数相加，再检查一遍结果，" * 8
    records = arithmetic_pairs(2) + [{"instruction": "2+2=?", "chosen": shared + "4", "rejected": shared + "5"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    model = str(tiny_checkpoint("chatglm2-6b"))
    short = cli("data", "check", "--data", str(path), "--model", model, "--max-length", "128")
    assert short.returncode == 0, short.stderr  # not bad records: a longer --max-length keeps them
    assert "cut to the same tokens by --max-length 128 (training leaves them out): 1" in short.stdout
    assert f"{path}:3\n" in short.stdout
    long = cli("data", "check", "--data", str(path), "--model", model, "--max-length", "1024")
    assert long.returncode == 0 and "cut to the same tokens" not in long.stdout
