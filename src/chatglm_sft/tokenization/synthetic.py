"""Small tokenizers laid out like each family's, trained in seconds on generated text.

They are not THUDM's vocabularies, but every id that chatglm-sft treats specially sits where the official file puts
it, and each file has the official file's kind, so loading, detection, chat prompts and decoding take the same paths
as with a real download:

* ChatGLM-6B: a unigram SentencePiece ``ice_text.model`` with byte fallback, ``<n>`` at 4, the dummy-prefix piece
  ``▁`` at 5, unused pieces up to 130,000, then ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>``,
  the ``<|tab|>``/``<|blank_n|>`` pieces THUDM's pre-processing produces, and the 256 byte pieces (130,344 in all).
* ChatGLM2/3: a BPE SentencePiece ``tokenizer.model`` with byte fallback padded to 64,789 pieces, so the special
  tokens the loader appends land on 64,789 on.
* GLM-4: a tiktoken ranks file (byte-level BPE with GLM-4's split pattern) padded to 151,329 ranks, so the special
  tokens start at 151,329.

Padding pieces are never produced by encoding: SentencePiece's UNUSED type, and for tiktoken byte strings of invalid
UTF-8 that no merge can build.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import bytes_to_unicode, import_protobuf

from chatglm_sft.families import Family, get_family
from chatglm_sft.tokenization.fast import GLM4_PATTERN
from chatglm_sft.tokenization.v1 import MAX_BLANK, preprocess

CHATGLM_V1_TEXT_PIECES = 130000
"""ChatGLM-6B's control pieces start here ([MASK] 130000 ... <dBLOCK> 130007)."""
CHATGLM_V1_CONTROL = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
CHATGLM2_PIECES = 64789
"""Pieces of ChatGLM2/3's tokenizer.model; the loader appends the special tokens after them."""
GLM4_RANKS = 151329
"""Ranks of GLM-4's tokenizer.model; the special tokens start here."""

# SentencePiece's ModelProto.SentencePiece.Type values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_ZH_SUBJECTS = ["小明", "老师", "我们", "这个模型", "妈妈", "同学们", "北京", "人工智能", "他", "这本书"]
_ZH_VERBS = ["喜欢", "学习", "看到", "写了", "讨论", "需要", "回答", "买了", "去了", "理解"]
_ZH_OBJECTS = ["苹果", "数学题", "一首诗", "公园", "天气", "问题", "中文", "电脑", "故事", "答案"]
_ZH_TAILS = ["。", "！", "？", "，然后休息了。", "，非常有趣。", "：很好。", "；明天继续。"]
_EN_WORDS = (
    "the model learns to answer short questions about numbers words and stories with care while a "
    "teacher writes clear examples for every student in the class today and tomorrow"
).split()


def sample_texts(count: int = 400, seed: int = 0) -> list[str]:
    """Deterministic mixed Chinese/English lines with digits, punctuation, newlines, tabs and runs of spaces."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        zh = "".join(rng.choice(part) for part in (_ZH_SUBJECTS, _ZH_VERBS, _ZH_OBJECTS, _ZH_TAILS))
        en = " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".?!,")
        number = f"{rng.randint(0, 9999)}{rng.choice(['+', '-', '*', '='])}{rng.randint(0, 99)}"
        layout = [zh, en, number][i % 3 :] + [zh, en, number][: i % 3]
        sep = rng.choice([" ", "\n", "  ", "\t", "\n\n", "    "])
        texts.append(sep.join(layout))
    return texts


def _proto_from_training(texts: list[str], **options):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto


def _add_piece(proto, piece: str, kind: int, score: float = 0.0) -> None:
    new = proto.pieces.add()
    new.piece, new.type, new.score = piece, kind, score


def _pad_unused(proto, size: int) -> None:
    for i in range(len(proto.pieces), size):
        _add_piece(proto, f"<unused_pad_{i}>", _UNUSED)


def write_chatglm_v1_tokenizer(folder: Path, texts: list[str] | None = None, vocab_size: int = 800) -> Path:
    """A unigram `ice_text.model` in ChatGLM-6B's layout, and THUDM's `tokenizer_config.json`."""
    texts = [preprocess(t) for t in texts or sample_texts()]
    trained = _proto_from_training(
        texts, vocab_size=vocab_size, model_type="unigram", user_defined_symbols=["<n>"], pad_id=3
    )
    by_type = {kind: [p for p in trained.pieces if p.type == kind] for kind in (_NORMAL, _BYTE)}
    # The reference has the dummy-prefix piece at 5, right after the meta pieces and <n>.
    normal = sorted(by_type[_NORMAL], key=lambda p: p.piece != "▁")
    proto = import_protobuf().ModelProto()
    proto.CopyFrom(trained)
    del proto.pieces[:]
    for piece in [*trained.pieces[:5], *normal]:  # <unk> <s> </s> <pad> <n>, then the learned pieces
        proto.pieces.append(piece)
    _pad_unused(proto, CHATGLM_V1_TEXT_PIECES)
    for name in CHATGLM_V1_CONTROL:
        _add_piece(proto, name, _CONTROL)
    for name in ["<|tab|>", *(f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1))]:
        _add_piece(proto, name, _USER_DEFINED)
    for piece in by_type[_BYTE]:
        proto.pieces.append(piece)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    config = {
        "name_or_path": "THUDM/chatglm-6b",
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "end_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0,
    }
    _write_config(folder, config)
    return path


def _added_tokens(family: Family, first_added: int) -> dict[str, dict]:
    """`added_tokens_decoder` entries for the special tokens past the base vocabulary (ChatGLM3's name its roles)."""
    return {
        str(token_id): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "special": True}
        for name, token_id in sorted(family.special_tokens.items(), key=lambda kv: kv[1])
        if token_id >= first_added
    }


def write_sentencepiece_tokenizer(
    folder: Path,
    family: str | Family = "chatglm2-6b",
    texts: list[str] | None = None,
    vocab_size: int = 800,
    whitespace_pieces: bool = False,
) -> Path:
    """A BPE `tokenizer.model` in ChatGLM2/3's layout and a `tokenizer_config.json` that names the family's special
    tokens (ChatGLM3's include its role tokens, which is how a ChatGLM3 folder is told from a ChatGLM2 one).
    `whitespace_pieces` lets pieces span spaces and runs of spaces (as ChatGLM3's ``▁▁▁▁`` do), so text that repeats
    whole phrases or indented JSON, such as a tools prompt, compresses into few pieces."""
    family = get_family(family) if isinstance(family, str) else family
    proto = _proto_from_training(
        texts or sample_texts(),
        vocab_size=vocab_size,
        model_type="bpe",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_by_whitespace=not whitespace_pieces,
        allow_whitespace_only_pieces=whitespace_pieces,
    )
    _pad_unused(proto, CHATGLM2_PIECES)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / family.tokenizer_file
    path.write_bytes(proto.SerializeToString())
    config = {
        "name_or_path": f"THUDM/{family.name}",
        "added_tokens_decoder": _added_tokens(family, CHATGLM2_PIECES),
        "remove_space": False,
        "do_lower_case": False,
        "padding_side": "left",
        "tokenizer_class": "ChatGLMTokenizer",
    }
    _write_config(folder, config)
    return path


def _invalid_utf8_strings(length: int):
    """Byte strings of 0xF8..0xFF (never in UTF-8 text) of one length: no merge of shorter ranks builds them."""
    return (bytes(t) for t in itertools.product(range(0xF8, 0x100), repeat=length))


def write_tiktoken_tokenizer(
    folder: Path,
    family: str | Family = "glm-4",
    texts: list[str] | None = None,
    vocab_size: int = 1000,
    split_digits: bool = False,
) -> Path:
    """A tiktoken ranks file (`base64(token) rank` per line) in GLM-4's layout and its `tokenizer_config.json`.
    `split_digits` learns no merge of digits (as the ChatGLM2/3 writer's sentencepiece does), so every number is
    spelt digit by digit; GLM-4's split pattern still applies when encoding."""
    family = get_family(family) if isinstance(family, str) else family
    bpe = Tokenizer(models.BPE())
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            *digits,
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts or sample_texts(), trainer)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    # The trainer numbers the 256 bytes first, then each merge in the order it was learnt: tiktoken's ranks.
    learnt = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    ranks = [bytes(to_byte[c] for c in token) for token, _ in learnt]
    padding = _invalid_utf8_strings(6)  # 8**6 strings, more than GLM-4 needs
    ranks += itertools.islice(padding, GLM4_RANKS - len(ranks))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / family.tokenizer_file
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(ranks)))
    added = _added_tokens(family, GLM4_RANKS)
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [entry["content"] for entry in added.values()],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": family.eos_token,
        "pad_token": family.eos_token,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    _write_config(folder, config)
    return path


def _write_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


WRITERS: dict[str, Callable[..., Path]] = {
    "sentencepiece-v1": lambda folder, family, texts, **options: write_chatglm_v1_tokenizer(folder, texts, **options),
    "sentencepiece": write_sentencepiece_tokenizer,
    "tiktoken": write_tiktoken_tokenizer,
}
"""`Family.tokenizer_kind` -> writer(folder, family, texts, **options) (options: the writer's keywords)."""


def write_tokenizer(folder: Path, family: str | Family, texts: list[str] | None = None, **options) -> Path:
    """The family-shaped tokenizer file and `tokenizer_config.json` in `folder`; returns the tokenizer file.
    `options` go to the family's writer (e.g. ``vocab_size``)."""
    family = get_family(family) if isinstance(family, str) else family
    return WRITERS[family.tokenizer_kind](Path(folder), family, texts, **options)


def whole_character_ids(family: Family, tokenizer_file: Path) -> list[int]:
    """The ids of a tokenizer written here that decode to whole characters on their own (its learnt pieces, but not
    its padding nor the bytes of a multi-byte character), and the family's special tokens. A random model that
    favours these speaks readable text, as a trained model does."""
    if family.tokenizer_kind == "tiktoken":
        lines = Path(tokenizer_file).read_text().splitlines()
        tokens = [base64.b64decode(line.split()[0]) for line in lines]
        whole = [rank for rank, token in enumerate(tokens) if _is_utf8(token)]
    else:
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(Path(tokenizer_file).read_bytes())
        whole = [i for i, p in enumerate(proto.pieces) if p.type != _UNUSED and not _is_high_byte(p)]
    return sorted({*whole, *family.special_tokens.values()})


def _is_utf8(token: bytes) -> bool:
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_high_byte(piece) -> bool:
    return piece.type == _BYTE and int(piece.piece[3:5], 16) >= 0x80
