"""Fast (HF `tokenizers`) tokenizers for ChatGLM2/3 and GLM-4, built from THUDM's own tokenizer files.

* ChatGLM2/3: the SentencePiece BPE model converts exactly (transformers' `SpmConverter` follows SentencePiece's
  normaliser, dummy prefix and byte fallback); the special tokens sit after its 64,789 pieces.
* GLM-4: the tiktoken rank file becomes a byte-level BPE with GLM-4's GPT-4-style split pattern.

`encode` adds the family's prefix (``[gMASK], sop``) through the post-processor, so a plain `AutoTokenizer` on an
exported folder adds it too. ChatGLM2/3's official tokenizers never turn text into special ids, while
`tokenizers` matches added tokens anywhere in text; their special tokens therefore get contents nobody types
(``<|chatglm-sop|>``), and only their ids matter. GLM-4's official tokenizer does match its special tokens in
text, so they keep their names.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, processors
from transformers.convert_slow_tokenizer import SpmConverter, TikTokenConverter, import_protobuf

from chatglm_sft.families import Family

GLM4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


def token_content(family: Family, name: str) -> str:
    """The string a special token has inside the fast tokenizer (see the module docstring)."""
    if family.matches_specials_in_text:
        return name
    return f"<|chatglm-{name.strip('<|>')}|>"


def _sentencepiece_backend(model_file: str) -> Tokenizer:
    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)


def _tiktoken_backend(model_file: str) -> Tokenizer:
    return TikTokenConverter(model_file, pattern=GLM4_PATTERN).converted()


def build_backend(family: Family, model_file: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` for `family`, with its special tokens at their official ids."""
    builders = {"sentencepiece": _sentencepiece_backend, "tiktoken": _tiktoken_backend}
    tok = builders[family.tokenizer_kind](model_file)
    for name, token_id in sorted(family.special_tokens.items(), key=lambda kv: kv[1]):
        if token_id < tok.get_vocab_size(with_added_tokens=False):
            continue  # already a piece of the base model (e.g. </s>, <unk>)
        if tok.get_vocab_size(with_added_tokens=True) != token_id:
            raise ValueError(
                f"{model_file}: special token {name} would get id "
                f"{tok.get_vocab_size(with_added_tokens=True)}, expected {token_id}"
            )
        tok.add_special_tokens([AddedToken(token_content(family, name), normalized=False, special=True)])
    prefix = [(token_content(family, n), family.id_of(n)) for n in family.prefix_tokens]
    single = " ".join(content for content, _ in prefix) + " $A"
    pair = single + " $B"
    tok.post_processor = processors.TemplateProcessing(single=single.strip(), pair=pair.strip(), special_tokens=prefix)
    return tok
