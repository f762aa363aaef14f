"""Dynamic batching for the server: requests that wait together are decoded together.

One worker thread owns the model. It takes every request waiting (up to `max_batch_size`), decodes them as one
left-padded batch — each row with its own sampling settings, stop rules and token budget — and sends each request
its text deltas as they come. Requests that arrive meanwhile form the next batch. A row equals its single-request
result under greedy decoding (see the engine), a cancelled request (client gone) leaves its batch at the next step,
and the number of requests in the system is bounded: `submit` raises `QueueFull` beyond it.

transformers' continuous batching (`generate_batch`, paged attention) serves models with 1-D positions and causal
masks; ChatGLM-6B's 2-D positions and prefix-LM mask do not fit it, so one scheduler over our engine serves all four
families the same way.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from chatglm_sft.infer.engine import Engine, Rows
from chatglm_sft.infer.sampling import SamplingParams


class QueueFull(Exception):
    """Too many requests are waiting or running."""


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """("delta", text) events, then one ("done", finish_reason) or ("error", message)."""
    cancelled: bool = False
    completion_tokens: int = 0

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler:
    def __init__(self, engine: Engine, max_batch_size: int = 8, max_queue: int = 64):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._waiting: queue.Queue[Job] = queue.Queue()
        self._in_system = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="chatglm-sft-decoder", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> Job:
        with self._lock:
            if self._in_system >= self.max_queue:
                raise QueueFull
            self._in_system += 1
        job = Job(prompt, params, asyncio.get_running_loop())
        self._waiting.put(job)
        return job

    def _work(self) -> None:
        while True:
            batch = [self._waiting.get()]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            batch = [job for job in batch if not self._drop_cancelled(job)]
            if batch:
                self._decode(batch)

    def _drop_cancelled(self, job: Job) -> bool:
        if job.cancelled:
            self._release(job, "cancelled")
            return True
        return False

    def _release(self, job: Job, reason: str) -> None:
        with self._lock:
            self._in_system -= 1
        job.emit("done", reason)

    def _decode(self, batch: list[Job]) -> None:
        rows = Rows(self.engine, [job.params for job in batch])
        try:
            steps = self.engine.decode_steps([job.prompt for job in batch], rows.params)
            for n, step in enumerate(steps, start=1):
                for row, job in enumerate(batch):
                    if job.cancelled and rows.reasons[row] is None:
                        rows.end(row, "cancelled")
                        self._release(job, "cancelled")
                for row, delta, reason in rows.advance(step.tolist(), n):
                    job = batch[row]
                    job.completion_tokens = len(rows.texts[row].ids)
                    if delta:
                        job.emit("delta", delta)
                    if reason is not None:
                        self._release(job, reason)
                if rows.done:
                    break
        except Exception as e:  # a failed batch must not take the server down: report it to its requests
            for row, job in enumerate(batch):
                if rows.reasons[row] is None:
                    with self._lock:
                        self._in_system -= 1
                    job.emit("error", f"{type(e).__name__}: {e}")
