"""The scheduler in-process (cancellation) and the web UI through gradio's own client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import torch

import chatglm_sft
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.serve.scheduler import Scheduler
from tests.conftest import TINY, need_shared
from tests.serve.test_server import free_port


def test_cancelled_request_stops_and_frees_its_slot():
    folder = need_shared(TINY / "chatglm2-6b-tiny")
    engine = Engine(chatglm_sft.load_model(folder, dtype=torch.float32), chatglm_sft.load_tokenizer(folder))
    scheduler = Scheduler(engine, max_batch_size=4, max_queue=2)

    async def run():
        long = scheduler.submit([64790, 64792, 100, 200], SamplingParams(max_new_tokens=10_000))
        short = scheduler.submit([64790, 64792, 300], SamplingParams(max_new_tokens=3))
        kind, _ = await asyncio.wait_for(long.events.get(), 30)
        long.cancelled = True
        reasons = {}
        for name, job in (("long", long), ("short", short)):
            while True:
                kind, value = await asyncio.wait_for(job.events.get(), 30)
                if kind == "done":
                    reasons[name] = value
                    break
        return reasons, long.completion_tokens

    reasons, generated = asyncio.run(run())
    assert reasons == {"long": "cancelled", "short": "length"}
    assert generated < 10_000
    assert scheduler._in_system == 0


def test_webui_streams_replies_through_gradio_client():
    from gradio_client import Client

    model = need_shared(TINY / "chatglm2-6b-tiny")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatglm_sft", "webui", "--model", str(model), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, ui = time.time() + 120, None
        while ui is None:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            try:
                ui = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(0.5)
        reply = ui.predict("你好", "", 8, 0.0, 1.0, api_name="/chat")
        engine = Engine(chatglm_sft.load_model(model, dtype=torch.float32), chatglm_sft.load_tokenizer(model))
        from chatglm_sft.infer.chat import ChatSession

        expected = "".join(ChatSession(engine, SamplingParams(max_new_tokens=8)).send("你好"))
        assert reply == expected and reply
        job = ui.submit("再说一次", "", 8, 0.0, 1.0, api_name="/chat")
        updates = list(job)
        assert updates and updates[-1] == job.result()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
