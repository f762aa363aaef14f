"""A small SentencePiece tokenizer laid out like ChatGLM2's: trained on the demo's text, padded with unused pieces
to ChatGLM2's 64,789, so the special tokens ([gMASK] 64790, sop 64792, ...) sit at their official ids and every
part of chatglm-sft treats the demo model as a ChatGLM2 folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
from transformers.convert_slow_tokenizer import import_protobuf

CHATGLM2_PIECES = 64789


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int = 600) -> Path:
    """Write `tokenizer.model` and a ChatGLM2-style `tokenizer_config.json` into `folder`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.getvalue())
    for i in range(len(proto.pieces), CHATGLM2_PIECES):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused_{i}>", 0.0, 5  # UNUSED: never produced by encoding
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "remove_space": False,
        "do_lower_case": False,
        "padding_side": "left",
        "chatglm_sft_family": "chatglm2-6b",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / "tokenizer.model"
