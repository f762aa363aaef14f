"""The HF export keeps tools: plain `AutoTokenizer.apply_chat_template(messages, tools=...)` on an exported folder
gives our encoder's ids, for THUDM's goldens and for random calls with awkward arguments."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

import chatglm_sft
from chatglm_sft.families import detect_family
from chatglm_sft.tokenization.export import export_hf_tokenizer
from tests.conftest import MODELS, need_shared
from tests.tools.test_parse_response import random_value
from tests.tools.test_tool_prompts import CONVERSATION, MODEL_OF, WEATHER, reference_cases

BUILTINS = [{"type": "python"}, {"type": "simple_browser"}, {"type": "cogview"}, {"type": "unknown"}]


def exported(folder, tmp_path):
    export_hf_tokenizer(detect_family(folder), folder, tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["chatglm3", "glm-4"])
def test_exported_template_gives_prompt_intended_goldens(tmp_path, family):
    plain = exported(need_shared(MODELS / MODEL_OF[family]), tmp_path)
    for case in reference_cases(family, "prompt_intended"):
        request = case["request"]
        tools = None if request.get("tool_choice") == "none" else request.get("tools")
        ids = plain.apply_chat_template(
            request["messages"], tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ids == case["input_ids"], case["id"]


def random_call(rng: random.Random) -> tuple[dict, object]:
    arguments = {f"k{i}": random_value(rng) for i in range(rng.randint(0, 3))}
    style = rng.choice(["ascii", "unicode", "compact", "object"])
    if style == "object":  # vLLM hands templates parsed arguments
        return arguments, arguments
    text = json.dumps(arguments, ensure_ascii=style == "ascii", separators=(",", ":") if style == "compact" else None)
    return arguments, text


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_exported_template_equals_encoder_on_random_tool_conversations(tiny_checkpoint, tmp_path, family):
    folder = tiny_checkpoint(family)
    ours, plain = chatglm_sft.load_tokenizer(folder), exported(folder, tmp_path)
    rng = random.Random(family)
    for _ in range(40):
        messages = [dict(m) for m in CONVERSATION]
        calls = []
        for k in range(rng.randint(1, 3)):
            _, arguments = random_call(rng)
            calls.append({"id": f"c{k}", "type": "function", "function": {"name": f"f{k}", "arguments": arguments}})
        messages[2] = {"role": "assistant", "content": rng.choice([None, "", "想一想。"]), "tool_calls": calls}
        results = ["ok", '{"a": 1}', "多行\n结果", "", None, {"t": 1}]
        messages[3:] = [{"role": "tool", "content": rng.choice(results)} for _ in calls]
        tools = rng.choice([None, [WEATHER], [WEATHER, *BUILTINS]])
        expected = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False)
        got = plain.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False)
        assert got == expected, json.dumps(messages, ensure_ascii=False)
