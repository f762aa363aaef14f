"""The demo's tokenizer: a small SentencePiece laid out like ChatGLM2's, trained on the demo's text (see
`chatglm_sft.tokenization.synthetic`), so the special tokens ([gMASK] 64790, sop 64792, ...) sit at their official
ids and every part of chatglm-sft treats the demo model as a ChatGLM2 folder."""

from __future__ import annotations

from pathlib import Path

from chatglm_sft.tokenization.synthetic import CHATGLM2_PIECES, write_sentencepiece_tokenizer

__all__ = ["CHATGLM2_PIECES", "train_tokenizer"]


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int = 600) -> Path:
    """Write `tokenizer.model` and a ChatGLM2-style `tokenizer_config.json` into `folder`."""
    return write_sentencepiece_tokenizer(folder, "chatglm2-6b", texts, vocab_size)
