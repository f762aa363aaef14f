"""A mixed workload against three servers in one run: `chatglm-sft serve` (continuous batching), the same with
`--scheduler static` (the previous design), and `transformers serve --continuous-batching` on the same model
exported with `chatglm-sft export --format hf`.

The workload (the same for each server, arrivals fixed by --seed): a few long requests (256-512 new tokens) arrive
first, then many short ones (8-16 new tokens) arrive over time. Every request streams (greedy); the script reports
completion tokens/s over the whole run and p50/p99 time to first token and latency of the short requests, and
checks that every greedy output of ours is the same under both schedulers.

    python benchmarks/serve_load.py [--model DIR] [--long 4] [--short 48] [--rate 6] [--no-transformers]

Without --model it writes a tiny ChatGLM2 checkpoint with a 1,024-token context (float32, CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, log: Path, timeout: float = 300) -> subprocess.Popen:
    """Start a server process and wait for its /health."""
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[:3]} did not start in {timeout} s")


def ours(model: str, port: int, scheduler: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "chatglm_sft",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--scheduler",
        scheduler,
        *extra,
    ]


def tiny_model(folder: Path) -> str:
    from chatglm_sft.models.synthetic import write_tiny_checkpoint

    return str(write_tiny_checkpoint(folder / "chatglm2-6b", "chatglm2-6b", max_positions=1024))


@dataclass
class Request:
    at: float
    """Seconds after the start when it is sent."""
    prompt: str
    max_tokens: int
    long: bool


@dataclass
class Result:
    request: Request
    ttft: float
    latency: float
    tokens: int
    text: str


def workload(long: int, short: int, rate: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    requests = [
        Request(0.2 * i, f"请写一篇很长的文章，题目是第{i}个故事", rng.randint(256, 512), True) for i in range(long)
    ]
    at = 1.0
    for i in range(short):
        at += rng.expovariate(rate)
        requests.append(Request(at, f"第{i}个问题：" + "请简短回答" * (i % 4), rng.randint(8, 16), False))
    return requests


async def send(http: httpx.AsyncClient, url: str, model: str, request: Request, start: float) -> Result:
    await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))
    sent = time.perf_counter()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, text, pieces, usage = None, "", 0, None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            delta = chunk["choices"][0].get("delta", {}).get("content") if chunk.get("choices") else None
            if delta:
                first = first or time.perf_counter()
                text += delta
                pieces += 1
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else pieces
    return Result(request, (first or done) - sent, done - sent, tokens, text)


async def run(url: str, model: str, requests: list[Request]) -> tuple[float, list[Result]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=httpx.Limits(max_connections=256)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*[send(http, url, model, r, start) for r in requests])
        return time.perf_counter() - start, results


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary(name: str, wall: float, results: list[Result]) -> dict:
    shorts = [r for r in results if not r.request.long]
    tokens = sum(r.tokens for r in results)
    row = {
        "server": name,
        "tokens_per_s": tokens / wall,
        "short_ttft_p50": percentile([r.ttft for r in shorts], 50),
        "short_ttft_p99": percentile([r.ttft for r in shorts], 99),
        "short_latency_p50": percentile([r.latency for r in shorts], 50),
        "short_latency_p99": percentile([r.latency for r in shorts], 99),
        "wall_s": wall,
        "tokens": tokens,
    }
    print(
        f"{name:28s} {row['tokens_per_s']:8.1f} tok/s | short TTFT p50 {row['short_ttft_p50']:.3f} s "
        f"p99 {row['short_ttft_p99']:.3f} s | short latency p50 {row['short_latency_p50']:.3f} s "
        f"p99 {row['short_latency_p99']:.3f} s | {tokens} tokens in {wall:.1f} s",
        flush=True,
    )
    return row


def bench(name: str, command: list[str], url: str, model: str, requests, folder: Path) -> tuple[dict, list]:
    proc = start(command, url, folder / f"{name.split()[0]}.log")
    try:
        asyncio.run(run(url, model, requests[:2]))  # warm-up
        wall, results = asyncio.run(run(url, model, requests))
        return summary(name, wall, results), results
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="THUDM-layout model folder (default: a tiny ChatGLM2)")
    parser.add_argument("--long", type=int, default=4)
    parser.add_argument("--short", type=int, default=48)
    parser.add_argument("--rate", type=float, default=6.0, help="short requests per second")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers serve")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model = args.model or tiny_model(folder)
    requests = workload(args.long, args.short, args.rate, args.seed)
    batch = ["--max-batch-size", str(args.max_batch_size), "--max-queue", "512"]
    rows, outputs = [], {}
    for scheduler in ("continuous", "static"):
        port = free_port()
        command = ours(model, port, scheduler, *batch)
        row, results = bench(
            f"chatglm-sft {scheduler}", command, f"http://127.0.0.1:{port}", "chatglm-sft", requests, folder
        )
        rows.append(row)
        outputs[scheduler] = [r.text for r in results]
    if not args.no_transformers:
        export = folder / "hf"
        subprocess.run(
            [sys.executable, "-m", "chatglm_sft", "export", "--model", model, "--output", str(export)], check=True
        )
        port = free_port()
        command = ["transformers", "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32"]
        command += ["--port", str(port), str(export)]
        row, _ = bench("transformers serve --cb", command, f"http://localhost:{port}", str(export), requests, folder)
        rows.append(row)
    mismatches = sum(a != b for a, b in zip(outputs["continuous"], outputs["static"], strict=True))
    continuous, static = rows[0], rows[1]
    print(f"short p99 latency continuous/static {continuous['short_latency_p99'] / static['short_latency_p99']:.3f}")
    print(f"throughput continuous/static {continuous['tokens_per_s'] / static['tokens_per_s']:.2f}")
    if len(rows) > 2:
        print(f"throughput continuous/transformers {continuous['tokens_per_s'] / rows[2]['tokens_per_s']:.2f}")
    print(f"greedy outputs differing between the schedulers: {mismatches}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "mismatches": mismatches}, indent=2))


if __name__ == "__main__":
    main()
