"""The tokenized-data cache is keyed by everything that shapes the ids: a changed tokenizer, template, setting or
data file rebuilds it instead of serving stale ids."""

from __future__ import annotations

import json
import shutil

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.data.dataset import cache_key
from chatglm_sft.data.formats import to_messages
from chatglm_sft.families import get_family
from chatglm_sft.tokenization.synthetic import sample_texts, write_tokenizer
from chatglm_sft.train.config import load_config
from chatglm_sft.train.loop import Dist, load_data


def examples(model, data, out):
    config = load_config(None, {"model": str(model), "data": str(data), "output": str(out), "max_length": 128})
    family = get_family("chatglm2-6b")
    train, _ = load_data(config, chatglm_sft.load_tokenizer(model, family=family.name), family, out, Dist())
    return [ids for ids, _ in train]


def test_another_tokenizer_in_the_same_output_gets_new_ids(tmp_path, tiny_checkpoint, tiny_alpaca):
    first = tiny_checkpoint("chatglm2-6b")
    second = tmp_path / "retokenized"
    shutil.copytree(first, second)
    write_tokenizer(second, "chatglm2-6b", texts=sample_texts(300, seed=7)[::-1])  # another vocabulary
    out = tmp_path / "out"
    ids_first = examples(first, tiny_alpaca, out)
    ids_second = examples(second, tiny_alpaca, out)
    tokenizer = chatglm_sft.load_tokenizer(second, family="chatglm2-6b")
    records = json.loads(tiny_alpaca.read_text(encoding="utf-8"))
    expected = [encode_conversation(tokenizer, to_messages(r, "alpaca")).input_ids for r in records]
    assert ids_first != ids_second
    assert sorted(map(list, ids_second)) == sorted(map(list, expected))
    assert len(list((out / "cache").iterdir())) == 2


def test_key_covers_data_tokenizer_family_settings(tmp_path, tiny_checkpoint, tiny_alpaca):
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("chatglm2-6b"), model)
    glm2, glm3 = get_family("chatglm2-6b"), get_family("chatglm3-6b")
    key = cache_key(tiny_alpaca, model, glm2, {"max_length": 128})
    assert key == cache_key(tiny_alpaca, model, glm2, {"max_length": 128})
    assert key != cache_key(tiny_alpaca, model, glm2, {"max_length": 256})
    assert key != cache_key(tiny_alpaca, model, glm3, {"max_length": 128})
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text() + " ")
    assert key != cache_key(tiny_alpaca, model, glm2, {"max_length": 128})
    data = tmp_path / "d.json"
    data.write_text(tiny_alpaca.read_text(encoding="utf-8").replace("Repeat", "Say"), encoding="utf-8")
    assert cache_key(data, model, glm2, {"max_length": 128}) != cache_key(
        tiny_alpaca, model, glm2, {"max_length": 128}
    )
