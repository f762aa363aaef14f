"""ChatGLM-6B's tokenizer: SentencePiece over `ice_text.model` with THUDM's text pre-processing.

Before SentencePiece, ``\\n`` becomes ``<n>``, a tab ``<|tab|>`` and a run of n spaces (2 <= n <= 80)
``<|blank_n|>``, replaced from the longest run down, as the reference does; decoding reverses it. `encode` appends
``[gMASK], <sop>``. Special-token strings typed in text stay text. The HF `tokenizers` conversion of this
unigram model breaks Viterbi ties differently from SentencePiece (seen on long runs of one letter), so this one
calls SentencePiece directly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizer

MAX_BLANK = 80


_BLANKS = re.compile(f" {{2,{MAX_BLANK}}}")
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")


def preprocess(text: str) -> str:
    """THUDM's pre-processing. Their replace loop from 80 spaces down equals one greedy left-to-right match of
    2..80 spaces: a run of 100 becomes blank_80 then blank_20, a run of 81 blank_80 and one space."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return _BLANKS.sub(lambda m: f"<|blank_{len(m.group())}|>", text)


def postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return _BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= MAX_BLANK else m.group(), text)


class ChatGLMv1Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("eos_token", "<eop>")
        kwargs.setdefault("bos_token", "<sop>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("mask_token", "[MASK]")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)
        self.gmask_token_id = self.sp.piece_to_id("[gMASK]")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # The reference never splits text on special-token strings: "[gMASK]" typed by a user is text.
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode_as_pieces(preprocess(text))

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return postprocess(self.sp.decode_pieces(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        ids = [i for i in ids if i != self.pad_token_id]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids and i != self.gmask_token_id]
        return postprocess(self.sp.decode_ids(ids))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            specials = {*self.all_special_ids, self.gmask_token_id}
            return [int(i in specials) for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + "ice_text.model")
        if Path(self.vocab_file).resolve() != out.resolve():
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)
