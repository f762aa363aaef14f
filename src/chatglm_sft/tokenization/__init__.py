"""`load_tokenizer`: THUDM's tokenizers, id-exact, as transformers tokenizers with the family's chat template."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from transformers import BatchEncoding, PreTrainedTokenizerFast

from chatglm_sft.conversation import encode_conversation, render_text
from chatglm_sft.errors import UserError
from chatglm_sft.families import Family, detect_family
from chatglm_sft.tokenization.fast import build_backend
from chatglm_sft.tokenization.v1 import ChatGLMv1Tokenizer, preprocess

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
        **kwargs,
    ):
        batched = bool(conversation) and isinstance(conversation[0], list | tuple)
        conversations = conversation if batched else [conversation]
        if not tokenize:
            texts = [render_text(self, c, add_generation_prompt) for c in conversations]
            return texts if batched else texts[0]
        ids = [encode_conversation(self, c, add_generation_prompt).input_ids for c in conversations]
        if not return_dict and return_tensors is None:
            return ids if batched else ids[0]
        enc = BatchEncoding({"input_ids": ids if batched else ids[0]})
        enc = self.pad(enc, padding=padding or (batched and return_tensors is not None), return_tensors=return_tensors)
        return enc


class ChatGLMTokenizerFast(ConversationMixin, PreTrainedTokenizerFast):
    """ChatGLM2/3 and GLM-4: a fast tokenizer built from THUDM's tokenizer file."""

    def __init__(self, *args, family: Family, **kwargs):
        self.family = family
        super().__init__(*args, **kwargs)
        # A second backend that never matches special tokens in text, for message contents.
        self._plain = Tokenizer.from_str(self.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True

    def encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

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


class ChatGLMv1ChatTokenizer(ConversationMixin, ChatGLMv1Tokenizer):
    """ChatGLM-6B's SentencePiece tokenizer with the conversation encoder."""

    def __init__(self, *args, family: Family, **kwargs):
        self.family = family
        super().__init__(*args, **kwargs)

    def encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(preprocess(text))

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
        backend = build_backend(family, str(model_file))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{model_file}: cannot read tokenizer ({e})") from None
    return ChatGLMTokenizerFast(tokenizer_object=backend, family=family, **fast_tokenizer_kwargs(family, backend))


def load_tokenizer(path: str | Path, family: str | None = None):
    """The id-exact tokenizer of a model folder (THUDM's layout or one exported by chatglm-sft)."""
    fam = detect_family(path, family)
    return build_tokenizer(fam, Path(path) / fam.tokenizer_file)
