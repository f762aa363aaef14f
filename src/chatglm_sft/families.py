"""The ChatGLM families as data: one `Family` record each, read everywhere else.

Code elsewhere never asks "which family is this?"; it reads a field of the record instead (the template, the
special ids, the stop ids, the LoRA targets, which converter and tokenizer builder to use).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatglm_sft.errors import UserError


@dataclass(frozen=True)
class Family:
    """Everything chatglm-sft needs to know about one model family."""

    name: str
    """Registry key, also accepted by `--family` (e.g. ``chatglm2-6b``)."""
    architecture: str
    """``glm`` (transformers' `GlmForCausalLM`) or ``chatglm-v1`` (our own ChatGLM-6B model)."""
    tokenizer_kind: str
    """``sentencepiece-v1`` (ice_text.model), ``sentencepiece`` (ChatGLM2/3) or ``tiktoken`` (GLM-4)."""
    tokenizer_file: str
    """Name of the tokenizer model file inside a checkpoint folder."""
    special_tokens: dict[str, int]
    """Special token names (as THUDM's tokenizer names them) and their ids."""
    prefix_tokens: tuple[str, ...]
    """Special tokens `encode` puts before the text (ChatGLM2/3, GLM-4)."""
    suffix_tokens: tuple[str, ...]
    """Special tokens `encode` puts after the text (ChatGLM-6B)."""
    eos_token: str
    """Token that ends a training example (appended after the last reply)."""
    pad_id: int
    """Padding id the official tokenizer uses."""
    stop_tokens: tuple[str, ...]
    """Tokens that end generation."""
    template: str
    """Name of the chat template in `chatglm_sft.templates`."""
    lora_targets: tuple[str, ...]
    """Default LoRA target module names for this family's model class."""
    recognise: Callable[[dict, dict], bool] = field(repr=False, compare=False)
    """Predicate over (config.json, tokenizer_config.json) that says a folder belongs to this family."""
    matches_specials_in_text: bool = False
    """Whether the official `encode` turns special-token strings typed in text into special ids (GLM-4 does)."""
    space_around_specials_in_decode: bool = False
    """Whether the official `decode` puts a space between special tokens and text (GLM-4's slow tokenizer does)."""
    fullwidth_punctuation: bool = False
    """Whether the official `chat()` makes half-width , ! : ; ? next to CJK characters full-width (ChatGLM-6B)."""
    tool_format: str | None = None
    """Name of the family's tool-calling format in `chatglm_sft.tools.formats.TOOL_FORMATS` (None: no tools)."""
    end_of_reply_token: str | None = None
    """Token after a training example's last message when it is not `eos_token` (GLM-4's fine-tuning appends
    ``<|user|>``, which also stops generation)."""

    def id_of(self, token: str) -> int:
        return self.special_tokens[token]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[self.eos_token]

    @property
    def reply_end_token(self) -> str:
        return self.end_of_reply_token or self.eos_token

    @property
    def reply_end_id(self) -> int:
        return self.special_tokens[self.reply_end_token]

    @property
    def stop_ids(self) -> list[int]:
        return [self.special_tokens[t] for t in self.stop_tokens]


def _vocab_size(config: dict) -> int | None:
    return config.get("padded_vocab_size") or config.get("vocab_size")


def _is_v1(config: dict, tok: dict) -> bool:
    return bool(config.get("position_encoding_2d")) or "inner_hidden_size" in config or _vocab_size(config) == 130528


def _is_glm4(config: dict, tok: dict) -> bool:
    return _vocab_size(config) == 151552 or tok.get("tokenizer_class") == "ChatGLM4Tokenizer"


def _has_role_tokens(tok: dict) -> bool:
    """ChatGLM3's tokenizer config names its role tokens (or a template using them); ChatGLM2's names none."""
    text = json.dumps(tok.get("added_tokens_decoder", {})) + str(tok.get("chat_template", ""))
    return "<|user|>" in text or "<|assistant|>" in text


def _is_v2_arch(config: dict) -> bool:
    return _vocab_size(config) == 65024


def _is_chatglm3(config: dict, tok: dict) -> bool:
    if not _is_v2_arch(config):
        return False
    if tok:
        return _has_role_tokens(tok) or tok.get("chatglm_sft_family") == "chatglm3-6b"
    # No tokenizer config to tell: the published configs differ only in `seq_length` (ChatGLM3-6B 8192).
    return config.get("seq_length") == 8192


def _is_chatglm2(config: dict, tok: dict) -> bool:
    return _is_v2_arch(config) and not _is_chatglm3(config, tok)


_V2_SPECIALS = {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793, "</s>": 2, "<unk>": 0}
_V3_ROLES = {"<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797}
_GLM_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="chatglm-6b",
            architecture="chatglm-v1",
            tokenizer_kind="sentencepiece-v1",
            tokenizer_file="ice_text.model",
            special_tokens={
                "[MASK]": 130000,
                "[gMASK]": 130001,
                "[sMASK]": 130002,
                "<sop>": 130004,
                "<eop>": 130005,
                "<pad>": 3,
                "<unk>": 0,
            },
            prefix_tokens=(),
            suffix_tokens=("[gMASK]", "<sop>"),
            eos_token="<eop>",
            pad_id=3,
            stop_tokens=("<eop>",),
            template="chatglm-6b",
            lora_targets=("query_key_value",),
            recognise=_is_v1,
            fullwidth_punctuation=True,
        ),
        Family(
            name="chatglm2-6b",
            architecture="glm",
            tokenizer_kind="sentencepiece",
            tokenizer_file="tokenizer.model",
            special_tokens=dict(_V2_SPECIALS),
            prefix_tokens=("[gMASK]", "sop"),
            suffix_tokens=(),
            eos_token="</s>",
            pad_id=0,
            stop_tokens=("</s>",),
            template="chatglm2-6b",
            lora_targets=_GLM_LORA,
            recognise=_is_chatglm2,
        ),
        Family(
            name="chatglm3-6b",
            architecture="glm",
            tokenizer_kind="sentencepiece",
            tokenizer_file="tokenizer.model",
            special_tokens={**_V2_SPECIALS, **_V3_ROLES},
            prefix_tokens=("[gMASK]", "sop"),
            suffix_tokens=(),
            eos_token="</s>",
            pad_id=0,
            stop_tokens=("</s>", "<|user|>", "<|observation|>"),
            template="chatglm3",
            lora_targets=_GLM_LORA,
            recognise=_is_chatglm3,
            tool_format="chatglm3",
        ),
        Family(
            name="glm-4",
            architecture="glm",
            tokenizer_kind="tiktoken",
            tokenizer_file="tokenizer.model",
            special_tokens={
                "<|endoftext|>": 151329,
                "[MASK]": 151330,
                "[gMASK]": 151331,
                "[sMASK]": 151332,
                "<sop>": 151333,
                "<eop>": 151334,
                "<|system|>": 151335,
                "<|user|>": 151336,
                "<|assistant|>": 151337,
                "<|observation|>": 151338,
                "<|begin_of_image|>": 151339,
                "<|end_of_image|>": 151340,
                "<|begin_of_video|>": 151341,
                "<|end_of_video|>": 151342,
            },
            prefix_tokens=("[gMASK]", "<sop>"),
            suffix_tokens=(),
            eos_token="<|endoftext|>",
            pad_id=151329,
            stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
            template="glm-4",
            lora_targets=_GLM_LORA,
            recognise=_is_glm4,
            matches_specials_in_text=True,
            space_around_specials_in_decode=True,
            tool_format="glm-4",
            end_of_reply_token="<|user|>",
        ),
    ]
}

ALIASES = {
    "glm-4-9b-chat": "glm-4",
    "glm4": "glm-4",
    "chatglm": "chatglm-6b",
    "chatglm2": "chatglm2-6b",
    "chatglm3": "chatglm3-6b",
}


def get_family(name: str) -> Family:
    """Look a family up by name or alias; unknown names are a `UserError` listing the known ones."""
    key = ALIASES.get(name, name)
    if key not in FAMILIES:
        raise UserError(f"unknown family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[key]


def read_json(path: Path) -> dict:
    """Read a JSON object from `path`, with errors that name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def detect_family(model_dir: str | Path, family: str | None = None) -> Family:
    """Classify a checkpoint folder, or honour an explicit `family` override.

    The recognisers read `config.json` and, when present, `tokenizer_config.json`; our own exported folders carry a
    ``chatglm_sft_family`` field that settles it.
    """
    model_dir = Path(model_dir)
    if family:
        return get_family(family)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found")
    config_path, tok_path = model_dir / "config.json", model_dir / "tokenizer_config.json"
    if not config_path.exists() and not tok_path.exists():
        raise UserError(f"{model_dir}: no config.json (not a model folder)")
    config = read_json(config_path) if config_path.exists() else {}
    tok = read_json(tok_path) if tok_path.exists() else {}
    for source in (config, tok):
        if source.get("chatglm_sft_family"):
            return get_family(source["chatglm_sft_family"])
    found = [f for f in FAMILIES.values() if f.recognise(config, tok)]
    if len(found) != 1:
        names = ", ".join(f.name for f in found) or "none"
        raise UserError(
            f"{model_dir}: cannot tell the model family from config.json (matches: {names}); "
            f"pass --family with one of {', '.join(FAMILIES)}"
        )
    return found[0]
