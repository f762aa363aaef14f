"""The tokenizer backend cache: a hit gives the tokenizer a fresh build gives; damage is rebuilt; keyed on content."""

from __future__ import annotations

import json
import shutil

from chatglm_sft import load_tokenizer
from chatglm_sft.families import get_family
from chatglm_sft.tokenization.cache import entry_path
from chatglm_sft.tokenization.fast import build_backend

TEXTS = ["你好，世界！", "Hello <|user|> world\n\n  x=1+2", "床前明月光", ""]


def test_a_cache_hit_is_the_tokenizer_a_fresh_build_gives(tmp_path, monkeypatch, tiny_checkpoint):
    folder = tiny_checkpoint("glm-4-9b-chat")
    monkeypatch.setenv("CHATGLM_SFT_CACHE", str(tmp_path / "cache"))
    family = get_family("glm-4")
    model_file = folder / family.tokenizer_file
    fresh = build_backend(family, str(model_file))
    plain = build_backend(family, str(model_file))
    plain.encode_special_tokens = True
    first = load_tokenizer(folder)  # a miss: builds and stores
    entry = entry_path(family, model_file)
    assert entry.is_file() and entry.is_relative_to(tmp_path / "cache")
    second = load_tokenizer(folder)  # a hit
    for tok in (first, second):
        assert tok.backend_tokenizer.to_str() == fresh.to_str()
        for text in TEXTS:
            assert tok.encode(text) == fresh.encode(text).ids
            assert tok.encode_plain(text) == plain.encode(text, add_special_tokens=False).ids
    # Special tokens in text: matched by `encode`, never by the message-content path.
    assert family.id_of("<|user|>") in first.encode("<|user|>")
    assert family.id_of("<|user|>") not in first.encode_plain("<|user|>")

    entry.write_text('{"not": "a tokenizer"')  # damaged: rebuilt, same ids, entry whole again
    again = load_tokenizer(folder)
    assert [again.encode(t) for t in TEXTS] == [first.encode(t) for t in TEXTS]
    json.loads(entry.read_text())


def test_the_key_follows_the_tokenizer_file(tmp_path, monkeypatch, tiny_checkpoint):
    folder = tiny_checkpoint("glm-4-9b-chat")
    monkeypatch.setenv("CHATGLM_SFT_CACHE", str(tmp_path / "cache"))
    family = get_family("glm-4")
    copy = tmp_path / family.tokenizer_file
    shutil.copy(folder / family.tokenizer_file, copy)
    assert entry_path(family, copy) == entry_path(family, folder / family.tokenizer_file)
    with copy.open("a") as f:
        f.write("IQ== 999999\n")
    assert entry_path(family, copy) != entry_path(family, folder / family.tokenizer_file)
