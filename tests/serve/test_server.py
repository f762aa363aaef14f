"""A real `chatglm-sft serve` process on localhost, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import TINY, need_shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra):
    model = need_shared(TINY / "chatglm2-6b-tiny")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatglm_sft",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max-batch-size", "8")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def chat(url, content, max_tokens=12, **kw):
    reply = client(url).chat.completions.create(
        model="chatglm-sft",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )
    return reply


def test_models_and_chat(server):
    assert [m.id for m in client(server).models.list().data] == ["chatglm-sft"]
    reply = client(server).chat.completions.create(
        model="chatglm-sft",
        messages=[{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}],
        max_tokens=10,
        temperature=0,
    )
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 10 and reply.usage.prompt_tokens > 0


def test_stream_equals_plain(server):
    plain = chat(server, "讲一个故事").choices[0].message.content
    stream = client(server).chat.completions.create(
        model="chatglm-sft",
        stream=True,
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "讲一个故事"}],
    )
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == plain and reasons[-1] in ("stop", "length")
    completion = client(server).completions.create(model="chatglm-sft", prompt="你好", max_tokens=6, temperature=0)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens <= 6


def test_concurrent_requests_equal_alone(server):
    prompts = [f"第{i}个问题：" + "请回答" * (i % 7) for i in range(32)]
    alone = {p: chat(server, p).choices[0].message.content for p in prompts[:8]}
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: chat(server, p).choices[0].message.content, prompts))
    assert len(together) == 32
    for prompt, text in zip(prompts, together, strict=True):
        if prompt in alone:
            assert text == alone[prompt]
    for prompt, text in zip(prompts[8:], together[8:], strict=True):
        assert text == chat(server, prompt).choices[0].message.content


@pytest.mark.parametrize(
    "body,status",
    [
        (b"{not json", 400),
        (b'{"model": "chatglm-sft"}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400),
        (b'{"messages": "hello"}', 400),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
        (b'{"messages": [{"role": "user", "content": 5}]}', 400),
        (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_huge_prompt_and_health_after(server):
    with pytest.raises(openai.BadRequestError):
        chat(server, "很" * 100_000)
    r = httpx.post(
        f"{server}/nlg/text_generate", json={"instruction": "写一句诗", "text": "春天", "max_new_tokens": 6}
    )
    assert r.status_code == 200 and isinstance(r.json()["response"], str)
    assert httpx.get(f"{server}/health").status_code == 200


def test_api_key():
    proc, url = start_server("--api-key", "sekret")
    try:
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert (
            client(url, "sekret")
            .chat.completions.create(model="chatglm-sft", messages=body["messages"], max_tokens=4)
            .choices
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_full_queue_answers_429_with_retry_after():
    proc, url = start_server("--max-queue", "2", "--max-batch-size", "1")
    try:

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"messages": [{"role": "user", "content": "讲一个很长的故事"}], "max_tokens": 200}
                return await asyncio.gather(*[http.post(f"{url}/v1/chat/completions", json=body) for _ in range(8)])

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes
        assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
