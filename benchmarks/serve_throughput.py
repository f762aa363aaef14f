"""Server throughput: 16 concurrent clients against one client at a time, on the same `chatglm-sft serve`.

Starts the server on a free localhost port, sends the same 32 chat requests (greedy, --max-tokens each) first one
after another, then from 16 concurrent clients, and prints completion tokens/s, p50/p99 latency and the ratio.

    python benchmarks/serve_throughput.py [--model DIR] [--requests 32] [--clients 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = await http.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0},
    )
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


async def run(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    limit = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=600) as http:

        async def limited(prompt):
            async with limit:
                return await one(http, url, prompt, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*[limited(p) for p in prompts])
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a generated tiny ChatGLM2)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.model is None:
        from chatglm_sft.models.synthetic import write_tiny_checkpoint

        args.model = str(write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "chatglm2-6b", "chatglm2-6b"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatglm_sft",
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--max-batch-size",
            str(args.clients),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        prompts = [f"第{i}个问题：请介绍一下" + "中国的历史" * (i % 5) for i in range(args.requests)]
        asyncio.run(run(url, prompts[:2], 1, args.max_tokens))  # warm-up
        rows = {}
        for name, clients in (("sequential", 1), ("concurrent", args.clients)):
            wall, latencies, tokens = asyncio.run(run(url, prompts, clients, args.max_tokens))
            rows[name] = tokens / wall
            print(
                f"{name:10s} clients {clients:2d}: {tokens} tokens in {wall:.2f} s = {tokens / wall:8.1f} tok/s, "
                f"p50 {percentile(latencies, 50):.3f} s, p99 {percentile(latencies, 99):.3f} s"
            )
        print(f"ratio {rows['concurrent'] / rows['sequential']:.2f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
