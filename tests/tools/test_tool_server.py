"""The server with tools: the official openai client's tool loop against a real HTTP server (a scripted tiny GLM-4
model makes the call), streamed tool-call deltas, forced calls, and the `chatglm-sft serve` process itself."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import chatglm_sft
from chatglm_sft.infer.engine import Engine
from chatglm_sft.serve.app import create_app
from tests.serve.test_server import start_server, stop
from tests.tools.test_tool_prompts import WEATHER

ARGUMENTS = '{"city": "Paris"}'
ANSWER = "Sunny."
FORCED = [{"role": "user", "content": "Paris"}]


class PromptScripted(torch.nn.Module):
    """The real model, with its output forced to a script chosen by the prompt's last two tokens (one request at a
    time): a deterministic 'model' for the server's own batching, chunked prefill and streaming."""

    def __init__(self, model, scripts: dict[tuple[int, int], list[int]]):
        super().__init__()
        self.model, self.config, self.scripts = model, model.config, scripts
        self.script, self.cursor = None, 0

    def forward(self, input_ids=None, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        ids = input_ids[0].tolist()
        if len(ids) > 1:  # a prompt (or its last chunk): choose the script
            self.script, self.cursor = self.scripts.get(tuple(ids[-2:]), self.script), 0
        else:
            self.cursor += 1
        if self.script is not None and self.cursor < len(self.script):
            out.logits[0, -1] = -1e4
            out.logits[0, -1, self.script[self.cursor]] = 1e4
        return out


QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
CALLED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}],
}
RESULT = {"role": "tool", "content": '{"sky": "clear"}'}


@pytest.fixture(scope="module")
def tool_server(tiny_checkpoint):
    folder = tiny_checkpoint("glm-4-9b-chat")
    tok = chatglm_sft.load_tokenizer(folder)
    model = chatglm_sft.load_model(folder, dtype="float32")
    observation, user_end = tok.special_id("<|observation|>"), tok.special_id("<|user|>")

    def prompt_end(messages, header=""):
        ids = tok.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True, return_dict=False)
        return tuple((ids + tok.encode_plain(header))[-2:])

    scripts = {  # after the question: a call; after its result: the answer; after a forced header: the arguments
        prompt_end(QUESTION): [*tok.encode_plain(f"get_weather\n{ARGUMENTS}"), observation],
        prompt_end([*QUESTION, CALLED, RESULT]): [*tok.encode_plain(ANSWER), user_end],
        prompt_end(FORCED, "get_weather\n"): [*tok.encode_plain(ARGUMENTS), observation],
    }
    engine = Engine(PromptScripted(model, scripts), tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_client_tool_loop(tool_server):
    messages = list(QUESTION)
    first = tool_server.chat.completions.create(model="chatglm-sft", messages=messages, tools=[WEATHER], max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # the loop as OpenAI documents it: the assistant message goes back as returned, then the tool's result
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({**RESULT, "tool_call_id": call.id})
    second = tool_server.chat.completions.create(
        model="chatglm-sft", messages=messages, tools=[WEATHER], max_tokens=40
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == ANSWER and not second.choices[0].message.tool_calls


def test_streamed_tool_call_deltas(tool_server):
    stream = tool_server.chat.completions.create(
        model="chatglm-sft",
        messages=QUESTION,
        tools=[WEATHER],
        max_tokens=40,
        stream=True,
    )
    deltas, reasons = [], []
    for chunk in stream:
        deltas += chunk.choices[0].delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")  # the name comes first
    assert len(deltas) > 2 and all(d.function.name is None for d in deltas[1:])  # then the arguments in pieces
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert reasons[-1] == "tool_calls"


def test_tool_choice_none_and_named(tool_server):
    plain = tool_server.chat.completions.create(
        model="chatglm-sft", messages=QUESTION, tools=[WEATHER], tool_choice="none", max_tokens=40
    )
    # no tools block and no parsing: the scripted reply comes back as text
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"
    forced = tool_server.chat.completions.create(
        model="chatglm-sft",
        messages=FORCED,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
    )
    [call] = forced.choices[0].message.tool_calls  # the header was forced, the model wrote the arguments
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.slow  # two real processes
def test_serve_process_with_tools_on_glm4_and_chatglm2(tiny_checkpoint):
    body = {
        "model": "chatglm-sft",
        "messages": [{"role": "user", "content": "北京天气？"}],
        "tools": [WEATHER],
        "max_tokens": 8,
    }
    proc, url = start_server(tiny_checkpoint("glm-4-9b-chat"))
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200
        message = answer.json()["choices"][0]["message"]
        assert isinstance(message["content"], str) or all(c["id"].startswith("call_") for c in message["tool_calls"])
    finally:
        stop(proc)
    proc, url = start_server(tiny_checkpoint("chatglm2-6b"))
    try:
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400 and "no tool-calling format" in refused.json()["error"]["message"]
        tool_result = {**body, "tools": None, "messages": [*body["messages"], {"role": "tool", "content": "1"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=tool_result, timeout=60).status_code == 400
    finally:
        stop(proc)
