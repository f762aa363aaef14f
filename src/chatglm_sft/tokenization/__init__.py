"""`load_tokenizer`: THUDM's tokenizers, id-exact, as transformers tokenizers with the family's chat template."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import BatchEncoding, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

from chatglm_sft.conversation import encode_conversation, render_text
from chatglm_sft.errors import UserError
from chatglm_sft.families import Family, detect_family
from chatglm_sft.tokenization.cache import load_backend
from chatglm_sft.tokenization.v1 import ChatGLMv1Tokenizer, preprocess
from chatglm_sft.tools import parse_reply

__all__ = ["load_tokenizer", "ChatGLMTokenizerFast", "ChatGLMv1ChatTokenizer"]


class ConversationMixin:
    """`apply_chat_template` through chatglm-sft's conversation encoder (message text is always plain text)."""

    family: Family

    def special_id(self, name: str) -> int:
        return self.family.id_of(name)

    def apply_chat_template(
        self,
        conversation,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        return_tensors=None,
        padding: bool = False,
        tools: list[dict] | None = None,
        **kwargs,
    ):
        batched = bool(conversation) and isinstance(conversation[0], list | tuple)
        conversations = conversation if batched else [conversation]
        if not tokenize:
            texts = [render_text(self, c, add_generation_prompt, tools) for c in conversations]
            return texts if batched else texts[0]
        ids = [encode_conversation(self, c, add_generation_prompt, tools=tools).input_ids for c in conversations]
        if return_tensors is None:
            if not return_dict:
                return ids if batched else ids[0]
            return self.pad(BatchEncoding({"input_ids": ids if batched else ids[0]}), padding=padding)
        # Tensors always carry a batch dimension (left-padded when the conversations differ in length).
        enc = self.pad(BatchEncoding({"input_ids": ids}), padding=True, return_tensors=return_tensors)
        return enc if return_dict else enc["input_ids"]

    def parse_response(self, text: str, tools: list[dict] | None = None) -> dict:
        """A generated reply as an OpenAI-style assistant message: ``content`` and, for calls, ``tool_calls``.

        Calls are read in the family's tool format (ChatGLM3's ``tool_call(...)`` through `ast`, GLM-4's JSON); with
        `tools`, only their names count. Anything malformed stays plain content; this never raises on model output.
        """
        return parse_reply(self.family, text, tools)[0]


class BatchFastPathMixin:
    """Plain texts in, ids out through the subclass's `batch_ids`; anything else (pairs, truncation, offsets,
    special-token masks) takes transformers' own path."""

    def _encode_plus(
        self,
        text,
        text_pair=None,
        add_special_tokens=True,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
        max_length=None,
        pad_to_multiple_of=None,
        padding_side=None,
        return_tensors=None,
        return_attention_mask=None,
        **kwargs,
    ):
        # The common case (plain texts in, ids out) through `batch_ids`, skipping transformers' per-token
        # bookkeeping (offsets for fast tokenizers, token strings for slow ones).
        texts = [text] if isinstance(text, str) else text
        extras = any(v for k, v in kwargs.items() if k.startswith("return_") or k in ("is_split_into_words", "stride"))
        plain = isinstance(texts, list | tuple) and all(isinstance(t, str) for t in texts)
        if (
            not plain
            or text_pair is not None
            or extras
            or truncation_strategy != TruncationStrategy.DO_NOT_TRUNCATE
            or kwargs.get("split_special_tokens")
        ):
            return super()._encode_plus(
                text,
                text_pair=text_pair,
                add_special_tokens=add_special_tokens,
                padding_strategy=padding_strategy,
                truncation_strategy=truncation_strategy,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                return_attention_mask=return_attention_mask,
                **kwargs,
            )
        ids = self.batch_ids(list(texts), add_special_tokens)
        single = isinstance(text, str)
        if padding_strategy == PaddingStrategy.DO_NOT_PAD and return_tensors is None:
            data = {"input_ids": ids[0] if single else ids}
            if return_attention_mask is not False:
                masks = [[1] * len(row) for row in ids]
                data["attention_mask"] = masks[0] if single else masks
            return BatchEncoding(data)
        encoding = BatchEncoding({"input_ids": ids[0] if single else ids})
        return self.pad(
            encoding,
            padding=padding_strategy,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            return_tensors=return_tensors,
        )


class ChatGLMTokenizerFast(BatchFastPathMixin, ConversationMixin, PreTrainedTokenizerFast):
    """ChatGLM2/3 and GLM-4: a fast tokenizer built from THUDM's tokenizer file."""

    def __init__(self, *args, family: Family, sentencepiece_file: str | None = None, **kwargs):
        self.family = family
        super().__init__(*args, **kwargs)
        # ChatGLM2/3 never match special tokens in text, so SentencePiece itself gives the same ids, faster.
        self._sp = spm.SentencePieceProcessor(model_file=sentencepiece_file) if sentencepiece_file else None
        self._prefix = [family.id_of(t) for t in family.prefix_tokens]
        # A second backend that never matches special tokens in text, for message contents. transformers copies the
        # `tokenizer_object` it is given, so the original can serve (rebuilding one costs a second per GLM-4 load).
        plain = kwargs.get("tokenizer_object")
        if plain is None or plain is self._tokenizer:
            plain = Tokenizer.from_str(self.backend_tokenizer.to_str())
        self._plain = plain
        self._plain.encode_special_tokens = True

    def encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def batch_ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if self._sp is not None:
            rows = self._sp.encode(texts)
            return [self._prefix + row for row in rows] if add_special_tokens else rows
        return [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._plain.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if not self.family.space_around_specials_in_decode:
            return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        # GLM-4's slow tokenizer decodes text between special tokens piecewise and joins the pieces with spaces.
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special = set(self.family.special_tokens.values())
        pieces, run = [], []
        for i in ids:
            if i in special:
                if run:
                    pieces.append(super()._decode(run, **kwargs))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self.convert_ids_to_tokens(i))
            else:
                run.append(i)
        if run:
            pieces.append(super()._decode(run, **kwargs))
        return " ".join(pieces)


class ChatGLMv1ChatTokenizer(BatchFastPathMixin, ConversationMixin, ChatGLMv1Tokenizer):
    """ChatGLM-6B's SentencePiece tokenizer with the conversation encoder."""

    def __init__(self, *args, family: Family, **kwargs):
        self.family = family
        super().__init__(*args, **kwargs)

    def encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(preprocess(text))

    def batch_ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        rows = self.sp.encode([preprocess(t) for t in texts])
        if add_special_tokens:
            for row in rows:
                row += (self.gmask_token_id, self.bos_token_id)
        return rows

    def encode_plain_with_offsets(self, text: str):
        raise NotImplementedError("the chatglm-6b template never needs offsets")


def fast_tokenizer_kwargs(family: Family, backend: Tokenizer) -> dict:
    """Special tokens and padding of a fast tokenizer, as THUDM's tokenizer sets them (left padding)."""
    return {
        "eos_token": backend.id_to_token(family.eos_id),
        "pad_token": backend.id_to_token(family.pad_id),
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }


def build_tokenizer(family: Family, model_file: str | Path):
    """The tokenizer for `family` from its tokenizer model file."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise UserError(f"{model_file}: tokenizer file not found")
    if family.tokenizer_kind == "sentencepiece-v1":
        return ChatGLMv1ChatTokenizer(str(model_file), family=family)
    try:
        backend = load_backend(family, model_file)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{model_file}: cannot read tokenizer ({e})") from None
    sentencepiece_file = str(model_file) if family.tokenizer_kind == "sentencepiece" else None
    return ChatGLMTokenizerFast(
        tokenizer_object=backend,
        family=family,
        sentencepiece_file=sentencepiece_file,
        **fast_tokenizer_kwargs(family, backend),
    )


def load_tokenizer(path: str | Path, family: str | None = None):
    """The id-exact tokenizer of a model folder (THUDM's layout or one exported by chatglm-sft)."""
    fam = detect_family(path, family)
    return build_tokenizer(fam, Path(path) / fam.tokenizer_file)
