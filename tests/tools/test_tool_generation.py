"""Generation with tools: the engine stops at <|observation|> and returns the parsed message; the chat loop feeds
tool results back. A scripted model (the tiny checkpoint's logits overridden) makes the calls."""

from __future__ import annotations

import json

import pytest
import torch

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.infer.chat import ChatSession
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from tests.conftest import cli
from tests.tools.test_tool_prompts import WEATHER


class Scripted(torch.nn.Module):
    """Runs the real model, then forces its next token to the next one of `script`."""

    def __init__(self, model, script: list[int]):
        super().__init__()
        self.model, self.config, self.script, self.calls = model, model.config, script, 0

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[:, -1] = -1e4
        out.logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1e4
        self.calls += 1
        return out


def reply_ids(tok, segments: list[tuple[str, str]]) -> list[int]:
    """What the model emits for assistant segments (metadata, content) after the prompt's <|assistant|>."""
    ids = []
    for k, (metadata, content) in enumerate(segments):
        ids += [tok.special_id("<|assistant|>")] if k else []
        ids += encode_conversation(tok, [{"role": "assistant", "metadata": metadata, "content": content}]).input_ids[
            3:-1
        ]
    return ids


CALL = {"chatglm3-6b": "```python\ntool_call(city='北京')\n```", "glm-4-9b-chat": '{"city": "北京"}'}


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_engine_stops_at_observation_and_chat_loop_feeds_results_back(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    tok = chatglm_sft.load_tokenizer(folder)
    model = chatglm_sft.load_model(folder, dtype="float32")
    observation, end = tok.special_id("<|observation|>"), tok.family.reply_end_id
    call = reply_ids(tok, [("", "Let me look."), ("get_weather", CALL[family])])
    answer = reply_ids(tok, [("", "晴，22度。")])
    marker = tok.encode_plain("never")  # after the stop token: must not be generated
    engine = Engine(Scripted(model, [*call, observation, *answer, end, *marker]), tok)
    session = ChatSession(engine, SamplingParams(max_new_tokens=len(call) + 8), tools=[WEATHER])

    message = session.reply_to([{"role": "user", "content": "北京天气？"}])
    assert message["content"] == "Let me look."
    [tool_call] = message["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "北京"}

    final = session.reply_to([{"role": "tool", "content": '{"weather": "晴", "temp": 22}'}])
    assert final == {"role": "assistant", "content": "晴，22度。"}
    # the history renders the call exactly as the model wrote it: the second prompt continues the first reply
    history = encode_conversation(tok, session.history[:-1], add_generation_prompt=True, tools=[WEATHER]).input_ids
    first = encode_conversation(tok, session.history[:1], add_generation_prompt=True, tools=[WEATHER]).input_ids
    assert history[: len(first) + len(call) + 1] == [*first, *call, observation]


@pytest.mark.slow  # two real processes
def test_chat_cli_with_tools(tiny_checkpoint, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER], ensure_ascii=False), encoding="utf-8")
    args = ["chat", "--tools", str(tools), "--max-new-tokens", "3"]
    result = cli(*args, "--model", str(tiny_checkpoint("glm-4-9b-chat")), input="北京天气？\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "assistant> " in result.stdout
    refused = cli(*args, "--model", str(tiny_checkpoint("chatglm2-6b")), input="hi\n")
    assert refused.returncode == 1 and "chatglm2-6b has no tool-calling format" in refused.stderr
