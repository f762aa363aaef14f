"""Tools in the one conversation encoder: THUDM-computed goldens (section 6 of FORMATS.md) and the contract's rules
checked piece by piece on the project's tiny tokenizers."""

from __future__ import annotations

import json

import pytest

import chatglm_sft
from chatglm_sft.errors import UserError
from chatglm_sft.tools.formats import CHATGLM3_TOOLS_SENTENCE, GLM4_FUNCTION_FOOTER, GLM4_TOOLS_HEADER
from tests.conftest import MODELS, SHARED, need_shared

TOOLS_DIR = SHARED / "reference" / "tools"
MODEL_OF = {"chatglm3": "chatglm3-6b", "glm-4": "glm-4-9b-chat"}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "北京天气？"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 22}'},
]


def reference_cases(family: str, kind: str) -> list[dict]:
    path = need_shared(TOOLS_DIR / f"{family}.tools.jsonl")
    cases = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [c for c in cases if c["kind"] == kind]


@pytest.mark.parametrize("family", ["chatglm3", "glm-4"])
def test_prompt_intended_goldens(family):
    cases = reference_cases(family, "prompt_intended")
    tok = chatglm_sft.load_tokenizer(need_shared(MODELS / MODEL_OF[family]))
    assert cases
    for case in cases:
        request = case["request"]
        tools = None if request.get("tool_choice") == "none" else request.get("tools")
        ids = tok.apply_chat_template(request["messages"], tools=tools, add_generation_prompt=True, return_dict=False)
        assert ids == case["input_ids"], case["id"]


def test_chatglm3_contract_piece_by_piece(tiny_checkpoint):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint("chatglm3-6b"))

    def message(role, metadata, content):
        # ChatGLM3's build_single_message: role token, then header and content encoded each on its own
        return [tok.special_id(f"<|{role}|>"), *tok.encode_plain(f"{metadata}\n"), *tok.encode_plain(content)]

    tools_text = CHATGLM3_TOOLS_SENTENCE + "\n" + json.dumps([WEATHER["function"]], indent=4, ensure_ascii=False)
    expected = [tok.special_id("[gMASK]"), tok.special_id("sop")]
    expected += message("system", "", tools_text) + message("system", "", "Be brief.")
    expected += message("user", "", "北京天气？") + message("assistant", "", "Let me look.")
    expected += message("assistant", "get_weather", "```python\ntool_call(city='北京')\n```")
    expected += message("observation", "", '{"temp": 22}') + [tok.special_id("<|assistant|>")]
    got = tok.apply_chat_template(CONVERSATION, tools=[WEATHER], add_generation_prompt=True, return_dict=False)
    assert got == expected


def test_glm4_contract_piece_by_piece(tiny_checkpoint):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint("glm-4-9b-chat"))

    def message(role, metadata, content):
        return [tok.special_id(f"<|{role}|>"), *tok.encode_plain(f"{metadata}\n{content}")]

    block = f"{GLM4_TOOLS_HEADER}\n## get_weather\n\n{json.dumps(WEATHER['function'], indent=4, ensure_ascii=False)}"
    expected = [tok.special_id("[gMASK]"), tok.special_id("<sop>")]
    expected += message("system", "", block + GLM4_FUNCTION_FOOTER) + message("system", "", "Be brief.")
    expected += message("user", "", "北京天气？") + message("assistant", "", "Let me look.")
    expected += message("assistant", "get_weather", '{"city": "北京"}')  # the arguments text exactly as sent
    expected += message("observation", "", '{"temp": 22}') + [tok.special_id("<|assistant|>")]
    got = tok.apply_chat_template(CONVERSATION, tools=[WEATHER], add_generation_prompt=True, return_dict=False)
    assert got == expected


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_no_tools_means_no_tools_block_but_history_stays(tiny_checkpoint, family):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    with_none = tok.apply_chat_template(CONVERSATION, tools=None, add_generation_prompt=True, tokenize=False)
    with_empty = tok.apply_chat_template(CONVERSATION, tools=[], add_generation_prompt=True, tokenize=False)
    assert with_none == with_empty
    assert "get_weather" in with_none and "You have access" not in with_none and "可用工具" not in with_none


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_tool_prompt_is_prefix_of_the_training_ids_of_its_call(tiny_checkpoint, family):
    """Inference and training share the encoder: a call learned in training is what the prompt leads into."""
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    from chatglm_sft.conversation import IGNORE_INDEX, encode_conversation

    prompt = encode_conversation(tok, CONVERSATION[:2], add_generation_prompt=True, tools=[WEATHER]).input_ids
    train = encode_conversation(tok, CONVERSATION[:3], tools=[WEATHER])
    assert train.input_ids[: len(prompt)] == prompt
    learned = [t for t in train.labels if t != IGNORE_INDEX]
    assert learned == train.input_ids[len(prompt) :]  # thought, its next role token, the call, the end token
    assert "get_weather" in tok.decode(learned)


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm2-6b"])
def test_families_without_tool_format_refuse_tools(tiny_checkpoint, family):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    with pytest.raises(UserError, match="no tool-calling format"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER], add_generation_prompt=True)
    with pytest.raises(UserError, match="no tool-calling format"):
        tok.apply_chat_template(CONVERSATION[1:], add_generation_prompt=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[], add_generation_prompt=True)


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_bad_calls_are_user_errors(tiny_checkpoint, family):
    tok = chatglm_sft.load_tokenizer(tiny_checkpoint(family))
    nameless = [{"type": "function", "function": {"arguments": "{}"}}]
    call = {"role": "assistant", "content": None, "tool_calls": nameless}
    with pytest.raises(UserError, match="needs a function with a name"):
        tok.apply_chat_template([CONVERSATION[1], call], add_generation_prompt=True)
    with pytest.raises(UserError, match="tools must be a list"):
        tok.apply_chat_template(CONVERSATION[1:2], tools={"get_weather": {}}, add_generation_prompt=True)
