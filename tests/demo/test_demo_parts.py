"""The demo's generators: problems with right answers, a tokenizer laid out like ChatGLM2's."""

from __future__ import annotations

import re

import sentencepiece as spm

from chatglm_sft.demo.problems import make_problems
from chatglm_sft.demo.tokenizer import CHATGLM2_PIECES, train_tokenizer
from chatglm_sft.eval.math23k import extract_answer
from chatglm_sft.families import detect_family
from chatglm_sft.tokenization import load_tokenizer


def test_problems_are_deterministic_and_right():
    problems = make_problems(300, seed=5)
    assert problems == make_problems(300, seed=5) and problems != make_problems(300, seed=6)
    for p in problems:
        a, op, b = re.match(r"(\d+)([+-])(\d+)=", p["solution"]).groups()
        assert p["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert extract_answer(p["solution"]) == p["answer"]
        assert a in p["question"] and b in p["question"]


def test_tokenizer_has_chatglm2_layout(tmp_path):
    problems = make_problems(500, seed=0)
    train_tokenizer([p["question"] + p["solution"] for p in problems], tmp_path, vocab_size=400)
    (tmp_path / "config.json").write_text('{"padded_vocab_size": 65024, "seq_length": 256}')
    assert detect_family(tmp_path).name == "chatglm2-6b"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.get_piece_size() == CHATGLM2_PIECES
    tok = load_tokenizer(tmp_path)
    for p in problems[:50]:
        text = p["question"] + p["solution"]
        ids = tok.encode(text)
        assert ids[:2] == [64790, 64792] and ids[2:] == sp.encode(text)
        assert max(ids[2:]) < 400  # unused padding pieces are never produced
        assert tok.decode(ids, skip_special_tokens=True) == text
