"""Tokenizer files for exported folders.

HF format: a `tokenizer.json` and a `tokenizer_config.json` with a Jinja `chat_template`, so plain
`transformers.AutoTokenizer` (and vLLM, `transformers serve`) produce the official ids without chatglm-sft. The
Jinja templates mirror `chatglm_sft.conversation`, tools included (OpenAI `tools`, assistant `tool_calls`,
`role: "tool"` results, as `chatglm_sft.tools.formats` maps them); the tests check both against THUDM's ids.
THUDM format: the tokenizer model file and a `tokenizer_config.json` in THUDM's style.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from chatglm_sft.families import Family
from chatglm_sft.tokenization import fast_tokenizer_kwargs
from chatglm_sft.tokenization.cache import load_backend
from chatglm_sft.tools.formats import (
    CHATGLM3_TOOLS_SENTENCE,
    GLM4_BUILTIN_TOOLS,
    GLM4_FUNCTION_FOOTER,
    GLM4_TOOLS_HEADER,
)

# ChatGLM2's official prompt, rounds from 1; `tokenizers` adds the SentencePiece dummy prefix after the specials.
_CHATGLM2 = (
    "{{- '<|chatglm-[gMASK]|><|chatglm-sop|>' -}}"
    "{%- set ns = namespace(round=0) -%}"
    "{%- for m in messages -%}"
    # An empty system or last reply writes nothing, as the encoder (an empty text has no tokens, no dummy prefix).
    "{%- if m['role'] == 'system' -%}{%- if m['content'] -%}{{- m['content'] + '\\n\\n' -}}{%- endif -%}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.round = ns.round + 1 -%}"
    "{{- '[Round ' ~ ns.round ~ ']\\n\\n问：' ~ m['content'] ~ '\\n\\n答：' -}}"
    "{%- elif m['role'] == 'assistant' and not loop.last -%}{{- m['content'] + '\\n\\n' -}}"
    # A last reply is a training target: encoded on its own (hence the dummy-prefix space), then the end token.
    "{%- elif m['role'] == 'assistant' and add_generation_prompt -%}"
    "{{- raise_exception('the chatglm2-6b template needs a user message last to prompt for a reply') -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- (' ' + m['content'] if m['content'] else '') + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# Python's `repr` of a JSON value, as THUDM's `format_function_call` writes ChatGLM3 call arguments (strings: the
# quote repr picks, backslash escapes for the quote, backslash, \n \r \t and non-printable characters).
_PY_REPR = r"""
{%- macro py_str(s) -%}
{%- set q = '"' if ("'" in s and '"' not in s) else "'" -%}
{{- q -}}
{%- for c in s -%}
{%- if c == q or c == '\\' -%}{{- '\\' ~ c -}}
{%- elif c == '\n' -%}{{- '\\n' -}}
{%- elif c == '\r' -%}{{- '\\r' -}}
{%- elif c == '\t' -%}{{- '\\t' -}}
{%- elif c.isprintable() -%}{{- c -}}
{%- else -%}{{- c.encode('unicode_escape').decode('ascii') -}}
{%- endif -%}
{%- endfor -%}
{{- q -}}
{%- endmacro -%}
{%- macro py_repr(v) -%}
{%- if v is none -%}{{- 'None' -}}
{%- elif v is sameas true -%}{{- 'True' -}}
{%- elif v is sameas false -%}{{- 'False' -}}
{%- elif v is string -%}{{- py_str(v) -}}
{%- elif v is mapping -%}{{- '{' -}}
{%- for k, x in v.items() -%}{{- py_repr(k) ~ ': ' ~ py_repr(x) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
{%- endfor -%}{{- '}' -}}
{%- elif v is iterable -%}{{- '[' -}}
{%- for x in v -%}{{- py_repr(x) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}{{- ']' -}}
{%- else -%}{{- v | string -}}
{%- endif -%}
{%- endmacro -%}
{%- macro json_word(w) -%}
{%- if w == 'true' -%}{{- 'True' -}}
{%- elif w == 'false' -%}{{- 'False' -}}
{%- elif w == 'null' -%}{{- 'None' -}}
{%- elif '.' in w or 'e' in w or 'E' in w -%}{{- w | float -}}
{%- else -%}{{- w | int -}}
{%- endif -%}
{%- endmacro -%}
"""
# JSON object text -> ``k1=v1, k2=v2`` (values as `py_repr` writes them), read character by character: a chat
# template cannot parse JSON, and OpenAI clients send arguments as JSON text.
_JSON_TO_KWARGS = r"""
{%- macro json_kwargs(text) -%}
{%- set ns = namespace(out='', depth=0, in_str=false, esc=false, uni=0, hex='', high=0, buf='', word='', key=false) -%}
{%- for c in text -%}
{%- if ns.in_str -%}
{%- if ns.uni > 0 -%}
{%- set ns.hex = ns.hex ~ c -%}{%- set ns.uni = ns.uni - 1 -%}
{%- if ns.uni == 0 -%}
{%- set code = ns.hex | int(base=16) -%}
{%- if 55296 <= code < 56320 -%}{%- set ns.high = code -%}
{%- elif 56320 <= code < 57344 and ns.high -%}
{%- set ns.buf = ns.buf ~ ('%c' | format(65536 + (ns.high - 55296) * 1024 + code - 56320)) -%}{%- set ns.high = 0 -%}
{%- else -%}{%- set ns.buf = ns.buf ~ ('%c' | format(code)) -%}
{%- endif -%}
{%- endif -%}
{%- elif ns.esc -%}
{%- set ns.esc = false -%}
{%- if c == 'u' -%}{%- set ns.uni = 4 -%}{%- set ns.hex = '' -%}
{%- else -%}{%- set ns.buf = ns.buf ~ {'n': '\n', 't': '\t', 'r': '\r', 'b': '\b', 'f': '\f'}.get(c, c) -%}
{%- endif -%}
{%- elif c == '\\' -%}{%- set ns.esc = true -%}
{%- elif c == '"' -%}
{%- set ns.in_str = false -%}
{%- if ns.depth == 1 and ns.key -%}{%- set ns.out = ns.out ~ ns.buf -%}{%- set ns.key = false -%}
{%- else -%}{%- set ns.out = ns.out ~ py_str(ns.buf) -%}
{%- endif -%}
{%- else -%}{%- set ns.buf = ns.buf ~ c -%}
{%- endif -%}
{%- elif c in ' \t\n\r,:{}[]"' -%}
{%- if ns.word -%}{%- set ns.out = ns.out ~ json_word(ns.word) -%}{%- set ns.word = '' -%}{%- endif -%}
{%- if c == '"' -%}{%- set ns.in_str = true -%}{%- set ns.buf = '' -%}
{%- elif c in '{[' -%}
{%- set ns.depth = ns.depth + 1 -%}
{%- if ns.depth > 1 -%}{%- set ns.out = ns.out ~ c -%}{%- else -%}{%- set ns.key = true -%}{%- endif -%}
{%- elif c in '}]' -%}
{%- if ns.depth > 1 -%}{%- set ns.out = ns.out ~ c -%}{%- endif -%}{%- set ns.depth = ns.depth - 1 -%}
{%- elif c == ',' -%}
{%- set ns.out = ns.out ~ ', ' -%}{%- if ns.depth == 1 -%}{%- set ns.key = true -%}{%- endif -%}
{%- elif c == ':' -%}{%- set ns.out = ns.out ~ ('=' if ns.depth == 1 else ': ') -%}
{%- endif -%}
{%- else -%}{%- set ns.word = ns.word ~ c -%}
{%- endif -%}
{%- endfor -%}
{{- ns.out -}}
{%- endmacro -%}
"""
# What both families do with OpenAI messages (chatglm_sft.tools.formats): tools first, results as observations, a
# call's text before its calls, one assistant message per call with the tool name as metadata; without a generation
# prompt, the token THUDM's fine-tuning puts after the last message (`reply_end`). `message` and `call_content` are
# each family's own.
_TOOL_CONVERSATION = r"""
{%- macro result_text(c) -%}
{%- if c is none or c is undefined -%}{%- elif c is string -%}{{- c -}}{%- else -%}{{- c | tojson -}}{%- endif -%}
{%- endmacro -%}
{{- prefix -}}
{%- if tools -%}{{- tools_block(tools, '') -}}{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' and m.tools -%}{{- tools_block(m.tools, m.content or '') -}}
{%- elif m.role in ('tool', 'function') -%}{{- message('observation', '', result_text(m.content)) -}}
{%- elif m.role == 'assistant' and (m.tool_calls or m.function_call) -%}
{%- if m.content is string and m.content and not m.function_call -%}
{{- message('assistant', '', m.content) -}}
{%- endif -%}
{%- for call in (m.tool_calls or [{'function': m.function_call}]) -%}
{{- message('assistant', call.function.name, call_content(call.function.arguments)) -}}
{%- endfor -%}
{%- else -%}{{- message(m.role, m.metadata or '', m.content or '') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- generation -}}{%- else -%}{{- reply_end -}}{%- endif -%}
"""
# ChatGLM3 encodes "{metadata}\n" and the content separately, each with SentencePiece's dummy prefix: the space
# after the newline stands for the content's own prefix (an empty content has none: no tokens at all).
_CHATGLM3 = (
    _PY_REPR
    + _JSON_TO_KWARGS
    + r"""
{%- set prefix = '<|chatglm-[gMASK]|><|chatglm-sop|>' -%}
{%- set generation = '<|chatglm-assistant|>' -%}
{%- set reply_end = eos_token -%}
{%- macro message(role, metadata, content) -%}
{{- '<|chatglm-' ~ role ~ '|>' ~ metadata ~ '\n' ~ (' ' ~ content if content else '') -}}
{%- endmacro -%}
{%- macro tools_block(tools, content) -%}
{%- set ns = namespace(plain=[]) -%}
{%- for t in tools -%}
{%- set ns.plain = ns.plain + [t.function if (t.type == 'function' and t.function is mapping) else t] -%}
{%- endfor -%}
{{- message('system', '', (content or SENTENCE) ~ '\n' ~ (ns.plain | tojson(indent=4))) -}}
{%- endmacro -%}
{%- macro call_content(arguments) -%}
{{- '```python\ntool_call(' -}}
{%- if arguments is string -%}{{- json_kwargs(arguments) -}}
{%- else -%}
{%- for k, v in arguments.items() -%}{{- k ~ '=' ~ py_repr(v) -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- ')\n```' -}}
{%- endmacro -%}
""".replace("SENTENCE", json.dumps(CHATGLM3_TOOLS_SENTENCE))
    + _TOOL_CONVERSATION
)
# GLM-4's template renders a message only when its content is non-empty, and a tools block before the messages.
_GLM4_BUILTINS = "".join(
    f"{{%- elif t.type == {json.dumps(name)} -%}}{{{{- {json.dumps(text)} -}}}}\n"
    for name, text in GLM4_BUILTIN_TOOLS.items()
)
_GLM4 = (
    r"""
{%- set prefix = '[gMASK]<sop>' -%}
{%- set generation = '<|assistant|>' -%}
{%- set reply_end = '<|user|>' -%}
{%- macro message(role, metadata, content) -%}
{%- if content -%}{{- '<|' ~ role ~ '|>' ~ metadata ~ '\n' ~ content -}}{%- endif -%}
{%- endmacro -%}
{%- macro tools_block(tools, content) -%}
{{- '<|system|>\n' ~ HEADER -}}
{%- for t in tools -%}
{%- if t.type == 'function' -%}
{{- '\n## ' ~ t.function.name ~ '\n\n' ~ (t.function | tojson(indent=4)) ~ FOOTER -}}
BUILTINS{%- endif -%}
{%- endfor -%}
{{- message('system', '', content) -}}
{%- endmacro -%}
{%- macro call_content(arguments) -%}
{%- if arguments is string -%}{{- arguments -}}{%- else -%}{{- arguments | tojson -}}{%- endif -%}
{%- endmacro -%}
""".replace("HEADER", json.dumps(GLM4_TOOLS_HEADER))
    .replace("FOOTER", json.dumps(GLM4_FUNCTION_FOOTER))
    .replace("BUILTINS", _GLM4_BUILTINS)
    + _TOOL_CONVERSATION
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
