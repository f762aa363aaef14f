"""A real `chatglm-sft serve` process on localhost, driven by the official openai client and httpx, on the generated
tiny ChatGLM2 checkpoint (context 256)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.conftest import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *extra):
    port = free_port()
    args = ["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatglm_sft", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
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


def stop(proc) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return err


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint("chatglm2-6b"), "--max-batch-size", "8", "--max-tokens-limit", "240")
    yield url, proc
    stop(proc)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def chat(url, content, max_tokens=12, **kw):
    return client(url).chat.completions.create(
        model="chatglm-sft",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


def metric(url: str, name: str) -> float:
    """A sample's value from /metrics (0 if absent)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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


def test_stream_equals_plain_and_ends_with_usage(server):
    plain = chat(server, "讲一个故事")
    stream = client(server).chat.completions.create(
        model="chatglm-sft",
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "讲一个故事"}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    completion = client(server).completions.create(model="chatglm-sft", prompt="你好", max_tokens=6, temperature=0)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens <= 6


def test_concurrent_requests_equal_alone(server):
    prompts = [f"第{i}个问题：" + "请回答" * (i % 7) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: chat(server, p).choices[0].message.content, prompts))
    for prompt, text in zip(prompts, together, strict=True):
        assert text == chat(server, prompt).choices[0].message.content


GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body,status",
    [
        (b"{not json", 400),
        (b'{"model": "chatglm-sft"}', 400),
        (b'{"messages": "hello"}', 400),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
        (b'{"messages": [{"role": "user", "content": 5}]}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 241}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1.0}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -1}', 400),
        (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404),
        (b'{"messages": []}', 400),
        (b'\xff\xfe{"messages": []}', 400),  # not UTF-8: FastAPI's own error, in OpenAI's body too
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 40.5}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', 400),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"]


BAD_VALUES = [
    {"temperature": 1e-45},
    {"seed": 2**70},
    {"top_p": 0},
    {"repetition_penalty": 1e-300},
    {"max_tokens": 10**9},
    {"temperature": 0.7, "top_k": 10**9},
]


def test_bad_requests_beside_good_ones_never_hurt_them(server):
    settings = {"max_tokens": 16, "temperature": 0}
    good = [{"messages": [{"role": "user", "content": f"问题{i}"}], **settings} for i in range(8)]
    bad = [{"messages": [{"role": "user", "content": "你好"}], "max_tokens": 16, **v} for v in BAD_VALUES]

    async def send_all():
        async with httpx.AsyncClient(timeout=120) as http:
            url = f"{server}/v1/chat/completions"
            return await asyncio.gather(*[http.post(url, json=b) for b in good + bad])

    responses = asyncio.run(send_all())
    for response in responses[len(good) :]:
        assert 400 <= response.status_code < 500, response.text
    for body, response in zip(good, responses, strict=False):
        assert response.status_code == 200
        alone = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).json()
        assert response.json()["choices"][0]["message"] == alone["choices"][0]["message"]


def test_huge_bodies_get_413_at_once(server):
    start = time.perf_counter()
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}'
    r = httpx.post(f"{server}/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert time.perf_counter() - start < 1.0

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"a" * (64 << 10)

    r = httpx.post(f"{server}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(f"{server}/health").status_code == 200


def test_unknown_routes_and_methods_get_openai_errors(server):
    for response, status in ((httpx.get(f"{server}/v1/nothing"), 404), (httpx.get(f"{server}/v1/completions"), 405)):
        assert response.status_code == status
        assert response.json()["error"]["message"] and response.json()["error"]["type"]


def test_whole_numbers_written_as_floats_are_integers(server):
    """JSON has one number type: 40.0 is 40 (clients that keep numbers as floats send it)."""
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0.7, "top_k": 40, "seed": 7}
    as_ints = httpx.post(f"{server}/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=60)
    as_floats = httpx.post(
        f"{server}/v1/chat/completions", json={**body, "max_tokens": 5.0, "top_k": 40.0, "seed": 7.0}, timeout=60
    )
    assert as_ints.status_code == as_floats.status_code == 200, as_floats.text
    assert as_floats.json()["choices"][0]["message"] == as_ints.json()["choices"][0]["message"]
    assert as_floats.json()["usage"]["completion_tokens"] <= 5


def test_openapi_describes_the_answers(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    assert '"422"' not in json.dumps(spec)  # validation errors are answered as 400s
    for path in ("/v1/chat/completions", "/v1/completions", "/nlg/text_generate"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "401", "413", "429", "500"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    assert "text/event-stream" in spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    chat = spec["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat["top_k"]["type"] == "integer" and chat["top_k"]["minimum"] == 0
    assert {"minimum": 1, "type": "integer"} in chat["max_tokens"]["anyOf"]
    assert chat["presence_penalty"]["maximum"] == chat["presence_penalty"]["minimum"] == 0
    assert chat["stop"]["anyOf"][1]["maxItems"] == 4


def test_text_generate_default_length_fits_the_server_limit(server):
    """Without max_new_tokens, the server's default (cut to --max-tokens-limit 240 here), not a fixed 256."""
    r = httpx.post(f"{server}/nlg/text_generate", json={"instruction": "写一句诗"}, timeout=120)
    assert r.status_code == 200, r.text


def test_long_prompt_is_refused_and_text_generate_works(server):
    with pytest.raises(openai.BadRequestError, match="prompt"):
        chat(server, "很" * 100_000)
    r = httpx.post(
        f"{server}/nlg/text_generate", json={"instruction": "写一句诗", "text": "春天", "max_new_tokens": 6}
    )
    assert r.status_code == 200 and isinstance(r.json()["response"], str)


def test_metrics_follow_traffic_and_disconnects(served):
    server, proc = served
    before = metric(server, "chatglm_sft_prompt_tokens_total"), metric(server, "chatglm_sft_generation_tokens_total")
    chat(server, "你好", max_tokens=4)
    after = metric(server, "chatglm_sft_prompt_tokens_total"), metric(server, "chatglm_sft_generation_tokens_total")
    assert after[0] > before[0] and after[1] > before[1]
    assert metric(server, "chatglm_sft_time_to_first_token_seconds_count") > 0

    async def leave_early():
        body = {"messages": [{"role": "user", "content": "讲一个很长的故事"}], "max_tokens": 200, "temperature": 0}
        async with httpx.AsyncClient(timeout=60) as http:
            # 16 clients send and then leave (their tasks cancelled: httpx closes each connection) while their
            # requests are in the scheduler, running or waiting for a row; a fixed client timeout instead raced
            # with how fast the tiny model finishes.
            async def in_scheduler() -> float:
                lines = (await http.get(f"{server}/metrics")).text.splitlines()
                gauges = ("chatglm_sft_requests_running ", "chatglm_sft_requests_waiting ")
                return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(gauges))

            posts = [asyncio.create_task(http.post(f"{server}/v1/chat/completions", json=body)) for _ in range(16)]
            while await in_scheduler() < 16:
                assert not any(p.done() for p in posts), "a request ended before its client left"
                await asyncio.sleep(0.005)
            for p in posts:
                p.cancel()
            await asyncio.gather(*posts, return_exceptions=True)
            async with http.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break  # a streaming client leaves after its first chunk

    ran_to_the_end = metric(server, 'chatglm_sft_requests_finished_total{reason="length"}')
    asyncio.run(leave_early())

    def all_cancelled() -> bool:
        # A row that ran on after its client left would end as "length" instead.
        idle = not (metric(server, "chatglm_sft_requests_running") or metric(server, "chatglm_sft_requests_waiting"))
        return idle and metric(server, 'chatglm_sft_requests_finished_total{reason="cancelled"}') >= 17

    deadline = time.perf_counter() + 10.0
    while not all_cancelled():
        assert time.perf_counter() < deadline, "rows of clients that left were not cancelled"
        time.sleep(0.05)
    assert metric(server, 'chatglm_sft_requests_finished_total{reason="length"}') == ran_to_the_end


def test_api_key(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint("chatglm2-6b"), "--api-key", "sekret")
    try:
        body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").status_code == 200
        ok = client(url, "sekret").chat.completions.create(
            model="chatglm-sft", messages=body["messages"], max_tokens=4
        )
        assert ok.choices
    finally:
        stop(proc)


def test_full_queue_answers_429_with_retry_after(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint("chatglm2-6b"), "--max-queue", "2", "--max-batch-size", "1")
    try:

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"messages": [{"role": "user", "content": "讲一个很长的故事"}], "max_tokens": 60}
                return await asyncio.gather(*[http.post(f"{url}/v1/chat/completions", json=body) for _ in range(8)])

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes
        assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
    finally:
        stop(proc)


async def _stream_text(http, url, body, streaming: asyncio.Event) -> tuple[str, float]:
    """Stream a chat completion (`streaming` set at its first text); returns its text and when it ended."""
    text = ""
    async with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    text += chunk["choices"][0]["delta"]["content"]
                    streaming.set()
    return text, time.perf_counter()


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["continuous"])
def test_short_requests_pass_long_ones(tiny_checkpoint, scheduler):
    """4 long streams (200 tokens), then 12 short requests (8 tokens) once all 4 stream: every short one ends in
    under a quarter of the time the long ones still need, and every output equals the request sent alone."""
    proc, url = start_server(tiny_checkpoint("chatglm2-6b"), "--max-batch-size", "16", "--scheduler", scheduler)

    def body(content, n):
        return {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0}

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as http:
            streaming = [asyncio.Event() for _ in range(4)]
            tasks = [
                asyncio.create_task(_stream_text(http, url, body(f"讲一个长故事{i}", 200), streaming[i]))
                for i in range(4)
            ]
            await asyncio.gather(*[event.wait() for event in streaming])
            start = time.perf_counter()

            async def short(i):
                r = await http.post(f"{url}/v1/chat/completions", json=body(f"短问题{i}", 8))
                return r.json()["choices"][0]["message"]["content"], time.perf_counter() - start

            shorts = await asyncio.gather(*[short(i) for i in range(12)])
            long_results = await asyncio.gather(*tasks)
            remaining = min(end for _, end in long_results) - start
            return shorts, [text for text, _ in long_results], remaining

    try:
        shorts, long_texts, remaining = asyncio.run(scenario())
        for i, (_, took) in enumerate(shorts):
            assert took < remaining / 4, f"short request {i} took {took:.2f} s; the long ones needed {remaining:.2f} s"
        for i, (text, _) in enumerate(shorts):
            assert (
                text
                == httpx.post(f"{url}/v1/chat/completions", json=body(f"短问题{i}", 8)).json()["choices"][0][
                    "message"
                ]["content"]
            )
        for i, text in enumerate(long_texts):
            alone = httpx.post(f"{url}/v1/chat/completions", json=body(f"讲一个长故事{i}", 200), timeout=300)
            assert text == alone.json()["choices"][0]["message"]["content"]
    finally:
        stop(proc)


def make_lora(model_dir, out_dir, seed: int):
    """A LoRA adapter with random (non-zero) weights on the family's usual target modules, in PEFT's format."""
    from peft import LoraConfig, get_peft_model

    import chatglm_sft
    from chatglm_sft.families import detect_family

    family = detect_family(model_dir)
    model = get_peft_model(
        chatglm_sft.load_model(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets))
    )
    g = torch.Generator().manual_seed(seed)
    for name, tensor in model.named_parameters():
        if "lora_" in name:
            tensor.data = torch.randn(tensor.shape, generator=g) * 0.3
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_two_adapters_answer_as_predict_does(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint("chatglm2-6b")
    adapters = {name: make_lora(model, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))}
    records = [{"instruction": q} for q in ("你好", "讲一个故事", "1+1=")]
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    expected = {}
    for name, folder in [*adapters.items(), ("chatglm-sft", None)]:
        out = tmp_path / f"{name}.jsonl"
        extra = ["--adapter", str(folder)] if folder else []
        args = ["predict", "--model", str(model), "--data", str(data), "--output", str(out), "--max-new-tokens", "12"]
        result = cli(*args, *extra)
        assert result.returncode == 0, result.stderr
        expected[name] = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    assert expected["a"] != expected["b"] != expected["chatglm-sft"]
    proc, url = start_server(model, "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}")
    try:
        assert [m.id for m in client(url).models.list().data] == ["chatglm-sft", "a", "b"]

        def ask(job):
            name, record = job
            reply = client(url).chat.completions.create(
                model=name, messages=[{"role": "user", "content": record["instruction"]}], max_tokens=12, temperature=0
            )
            return reply.choices[0].message.content.strip()

        jobs = [(name, record) for name in expected for record in records]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all adapters in flight at once
            answers = list(pool.map(ask, jobs))
        assert answers == [text for name in expected for text in expected[name]]
    finally:
        stop(proc)
