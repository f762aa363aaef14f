"""Tokenizer files for exported folders.

HF format: a `tokenizer.json` and a `tokenizer_config.json` with a Jinja `chat_template`, so plain
`transformers.AutoTokenizer` (and vLLM, `transformers serve`) produce the official ids without chatglm-sft. The
Jinja templates mirror `chatglm_sft.conversation`; the tests check both against THUDM's ids. THUDM format: the
tokenizer model file and a `tokenizer_config.json` in THUDM's style.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from chatglm_sft.families import Family
from chatglm_sft.tokenization import fast_tokenizer_kwargs
from chatglm_sft.tokenization.cache import load_backend

# ChatGLM2's official prompt, rounds from 1; `tokenizers` adds the SentencePiece dummy prefix after the specials.
_CHATGLM2 = (
    "{{- '<|chatglm-[gMASK]|><|chatglm-sop|>' -}}"
    "{%- set ns = namespace(round=0) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.round = ns.round + 1 -%}"
    "{{- '[Round ' ~ ns.round ~ ']\\n\\n问：' ~ m['content'] ~ '\\n\\n答：' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- m['content'] -}}{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# ChatGLM3 encodes "{metadata}\n" and the content separately, each with SentencePiece's dummy prefix: the space
# after the newline stands for the content's own prefix.
_CHATGLM3 = (
    "{{- '<|chatglm-[gMASK]|><|chatglm-sop|>' -}}"
    "{%- for m in messages -%}"
    "{{- '<|chatglm-' ~ m['role'] ~ '|>' ~ (m['metadata'] or '') ~ '\\n ' ~ m['content'] -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|chatglm-assistant|>' -}}{%- endif -%}"
)
_GLM4 = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- for m in messages -%}"
    "{{- '<|' ~ m['role'] ~ '|>' ~ (m['metadata'] or '') ~ '\\n' ~ m['content'] -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
JINJA_TEMPLATES = {"chatglm2-6b": _CHATGLM2, "chatglm3": _CHATGLM3, "glm-4": _GLM4}

_THUDM_TOKENIZER_CLASS = {
    "sentencepiece-v1": "ChatGLMTokenizer",
    "sentencepiece": "ChatGLMTokenizer",
    "tiktoken": "ChatGLM4Tokenizer",
}


def _copy_model_file(family: Family, src_dir: Path, out_dir: Path) -> None:
    src = src_dir / family.tokenizer_file
    if src.resolve() != (out_dir / family.tokenizer_file).resolve():
        shutil.copyfile(src, out_dir / family.tokenizer_file)


def export_hf_tokenizer(family: Family, src_dir: Path, out_dir: Path) -> None:
    """Write a standalone fast tokenizer (GLM families) plus the tokenizer model file chatglm-sft reads."""
    _copy_model_file(family, src_dir, out_dir)
    if family.template not in JINJA_TEMPLATES:  # ChatGLM-6B: no fast tokenizer reproduces its ids
        export_thudm_tokenizer(family, src_dir, out_dir)
        return
    backend = load_backend(family, src_dir / family.tokenizer_file)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=JINJA_TEMPLATES[family.template],
        **fast_tokenizer_kwargs(family, backend),
    )
    tok.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chatglm_sft_family"] = family.name
    # transformers 5 writes the template to chat_template.jinja; older readers (vLLM among them) look here
    config["chat_template"] = JINJA_TEMPLATES[family.template]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def export_thudm_tokenizer(family: Family, src_dir: Path, out_dir: Path) -> None:
    """THUDM's tokenizer files: the model file and a `tokenizer_config.json` naming their class."""
    _copy_model_file(family, src_dir, out_dir)
    config = {
        "tokenizer_class": _THUDM_TOKENIZER_CLASS[family.tokenizer_kind],
        "remove_space": False,
        "do_lower_case": False,
        "padding_side": "left",
        "chatglm_sft_family": family.name,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
