"""Soak test of `chatglm-sft serve`: many requests from concurrent clients, a tenth of them malformed.

1,000 requests (--quick: 160) from 32 concurrent clients against one server with an API key. 10% are malformed —
bad JSON, wrong types, out-of-range values, oversize bodies, an unknown model, a wrong key — and must each get their
4xx; the others are greedy or seeded chat and text completions, some streamed, whose output must equal the same
request sent alone (measured first, one at a time). Ends with the line `5xx N hangs N mismatches N` and exits 1
unless all three are 0 and every malformed request got its status.

    python benchmarks/serve_soak.py [--quick] [--model DIR] [--requests 1000] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_load import free_port, ours, start

KEY = "soak-key"
MESSAGES = [{"role": "user", "content": "你好"}]


def malformed() -> list[tuple[str, dict, bytes, int]]:
    """(name, headers, body, expected status) of each kind of bad request."""
    ok = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

    def body(**fields) -> bytes:
        return json.dumps({"messages": MESSAGES, "max_tokens": 8, **fields}).encode()

    return [
        ("bad json", ok, b'{"messages": [', 400),
        ("messages not a list", ok, json.dumps({"messages": "hi"}).encode(), 400),
        ("max_tokens a string", ok, body(max_tokens="8"), 400),
        ("content a number", ok, json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400),
        ("tiny temperature", ok, body(temperature=1e-45), 400),
        ("huge seed", ok, body(seed=2**70, temperature=0.8), 400),
        ("top_p 0", ok, body(top_p=0), 400),
        ("tiny repetition penalty", ok, body(repetition_penalty=1e-300), 400),
        ("huge max_tokens", ok, body(max_tokens=10**9), 400),
        ("oversize body", ok, b'{"messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}', 413),
        ("unknown model", ok, body(model="gpt-4"), 404),
        ("wrong key", {**ok, "authorization": "Bearer nope"}, body(), 401),
    ]


def good_requests(count: int, rng: random.Random) -> list[dict]:
    """Distinct well-formed requests: greedy and seeded, chat and text, short and longer."""
    requests = []
    for i in range(count):
        kind = {"path": "/v1/chat/completions" if i % 4 else "/v1/completions", "stream": i % 3 == 0}
        fields = {"max_tokens": rng.randint(4, 48), "temperature": 0}
        if i % 5 == 0:
            fields |= {"temperature": 0.8, "top_p": 0.9, "seed": rng.randint(0, 2**31)}
        content = f"第{i}个请求：" + "请详细说明" * rng.randint(0, 6)
        if kind["path"] == "/v1/completions":
            fields["prompt"] = content
        else:
            fields["messages"] = [{"role": "user", "content": content}]
        requests.append({**kind, "body": {**fields, "stream": kind["stream"]}})
    return requests


async def send_good(http: httpx.AsyncClient, url: str, request: dict) -> tuple[int, str]:
    headers = {"authorization": f"Bearer {KEY}"}
    if not request["stream"]:
        r = await http.post(url + request["path"], json=request["body"], headers=headers)
        if r.status_code != 200:
            return r.status_code, r.text
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] if "message" in choice else choice["text"]
    text = ""
    async with http.stream("POST", url + request["path"], json=request["body"], headers=headers) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 500, json.dumps(chunk)
                choice = chunk["choices"][0] if chunk["choices"] else {}
                text += choice.get("delta", {}).get("content") or choice.get("text") or ""
    return 200, text


async def soak(url: str, total: int, clients: int, distinct: int, seed: int) -> dict:
    rng = random.Random(seed)
    goods = good_requests(distinct, rng)
    bads = malformed()
    timeout = httpx.Timeout(120)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients + 8)) as http:
        alone = [await send_good(http, url, g) for g in goods]  # one at a time: each request's solo output
        assert all(status == 200 for status, _ in alone), [a for a in alone if a[0] != 200][:3]
        plan = [
            ("bad", rng.randrange(len(bads))) if rng.random() < 0.1 else ("good", rng.randrange(len(goods)))
            for _ in range(total)
        ]
        counts = {"5xx": 0, "hangs": 0, "mismatches": 0, "wrong_4xx": 0, "good": 0, "bad": 0, "other": 0, "broken": 0}
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)

        async def client():
            while not queue.empty():
                kind, index = queue.get_nowait()
                counts[kind] += 1
                try:
                    if kind == "good":
                        status, text = await send_good(http, url, goods[index])
                        if status == 200 and text != alone[index][1]:
                            counts["mismatches"] += 1
                    else:
                        name, headers, body, expected = bads[index]
                        r = await http.post(url + "/v1/chat/completions", content=body, headers=headers)
                        status = r.status_code
                        if status != expected:
                            counts["wrong_4xx"] += 1
                            print(f"{name}: got {status}, expected {expected}: {r.text[:200]}", file=sys.stderr)
                    if status >= 500:
                        counts["5xx"] += 1
                    elif kind == "good" and status != 200:
                        counts["other"] += 1
                except httpx.TimeoutException:
                    counts["hangs"] += 1
                except httpx.TransportError as e:  # a connection the server broke
                    counts["broken"] += 1
                    print(f"{kind} request {index}: {type(e).__name__} {e}", file=sys.stderr)

        start_time = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        counts["seconds"] = round(time.perf_counter() - start_time, 1)
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="THUDM-layout model folder (default: a tiny ChatGLM2)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=48, help="distinct good requests")
    parser.add_argument("--quick", action="store_true", help="160 requests, 24 distinct")
    parser.add_argument("--scheduler", default="continuous", choices=("continuous", "static"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.distinct = 160, 24
    folder = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    if args.model is None:
        from chatglm_sft.models.synthetic import write_tiny_checkpoint

        args.model = str(write_tiny_checkpoint(folder / "chatglm2-6b", "chatglm2-6b"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ours(args.model, port, args.scheduler, "--api-key", KEY, "--max-batch-size", "16", "--max-queue", "256")
    proc = start(command, url, folder / "server.log")
    try:
        counts = asyncio.run(soak(url, args.requests, args.clients, args.distinct, args.seed))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(
        f"{args.requests} requests ({counts['good']} good, {counts['bad']} malformed) from {args.clients} clients "
        f"in {counts['seconds']} s; malformed with another status than theirs: {counts['wrong_4xx']}; "
        f"good ones refused: {counts['other']}; broken connections: {counts['broken']}"
    )
    print(f"5xx {counts['5xx']} hangs {counts['hangs']} mismatches {counts['mismatches']}")
    failures = ("5xx", "hangs", "mismatches", "wrong_4xx", "other", "broken")
    ok = not any(counts[name] for name in failures)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
