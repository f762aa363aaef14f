"""`chatglm-sft webui` as a real process, driven through gradio's own client: login, replies equal to ChatSession's,
and the KV cache of the conversation kept between turns."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import torch

import chatglm_sft
from chatglm_sft.infer.chat import ChatSession
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.serve.webui import make_reply
from tests.serve.test_server import free_port


def test_webui_needs_its_login_and_replies_as_chat_session(tiny_checkpoint):
    from gradio_client import Client

    model = tiny_checkpoint("chatglm2-6b")
    port = free_port()
    args = ["webui", "--model", str(model), "--port", str(port), "--auth", "ann:s3cret"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatglm_sft", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:  # not listening yet
                time.sleep(0.5)
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own or httpx's errors
            Client(url, verbose=False).predict("你好", "", 8, 0.0, 1.0, api_name="/chat")
        ui = Client(url, auth=("ann", "s3cret"), verbose=False)
        reply = ui.predict("你好", "", 8, 0.0, 1.0, api_name="/chat")
        engine = Engine(chatglm_sft.load_model(model, dtype=torch.float32), chatglm_sft.load_tokenizer(model))
        expected = "".join(ChatSession(engine, SamplingParams(max_new_tokens=8)).send("你好"))
        assert reply == expected and reply
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_reply_reuses_the_conversation_cache(tiny_checkpoint):
    folder = tiny_checkpoint("chatglm2-6b")
    engine = Engine(chatglm_sft.load_model(folder, dtype=torch.float32), chatglm_sft.load_tokenizer(folder))
    computed = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        computed.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    engine.model.forward = counting
    reply = make_reply(engine)
    first = list(reply("你好", [], "", 6, 0.0, 1.0))[-1]
    prefill_alone = computed[0]
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first}]
    computed.clear()
    second = list(reply("再说一次", history, "", 6, 0.0, 1.0))[-1]
    session = ChatSession(engine, SamplingParams(max_new_tokens=6))
    list(session.send("你好"))
    assert second == "".join(session.send("再说一次"))
    assert computed[0] < prefill_alone + len(engine.tokenizer.encode("再说一次"))  # not the whole conversation again


def test_adapter_selector_picks_the_adapter(tmp_path, tiny_checkpoint):
    from chatglm_sft.families import get_family
    from chatglm_sft.serve.adapters import load_adapters
    from chatglm_sft.serve.webui import BASE
    from tests.serve.test_server import make_lora

    folder = tiny_checkpoint("chatglm2-6b")
    tokenizer = chatglm_sft.load_tokenizer(folder)
    dirs = {name: make_lora(folder, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))}
    model, keys = load_adapters(chatglm_sft.load_model(folder, dtype=torch.float32), dirs, get_family("chatglm2-6b"))
    reply = make_reply(Engine(model, tokenizer), keys)
    answers = {name: list(reply("你好", [], "", 8, 0.0, 1.0, name))[-1] for name in ("a", BASE, "b")}
    for name, adapter in (("a", dirs["a"]), ("b", dirs["b"]), (BASE, None)):
        alone = Engine(chatglm_sft.load_model(folder, dtype=torch.float32, adapter=adapter), tokenizer)
        assert answers[name] == "".join(ChatSession(alone, SamplingParams(max_new_tokens=8)).send("你好"))
    assert len(set(answers.values())) == 3
