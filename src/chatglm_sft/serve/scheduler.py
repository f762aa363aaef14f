"""The server's schedulers: one worker thread owns the model and decodes every request.

`ContinuousScheduler` (the default) schedules per decode step, as vLLM and TGI do: at every step waiting requests are
prefilled and join the running batch, and a row that finishes or whose client left is dropped at once. Prompts
longer than `prefill_chunk` tokens are read a chunk per step, so running rows keep advancing meanwhile. Every row
has its own sampling settings, generator, stop rules and budget; a failure while choosing one row's token ends that
row only, and a failed forward pass ends the rows it computed (both logged with the traceback and request id).

`StaticScheduler` is the previous design, kept for comparison (`serve --scheduler static`): it takes what waits and
decodes that batch until its longest row ends.

transformers' continuous batching (`generate_batch`, paged attention) serves models with 1-D positions and causal
masks; ChatGLM-6B's 2-D positions and prefix-LM mask do not fit it, so this scheduler over our engine serves all
four families the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from chatglm_sft.infer.engine import Engine, Rows, seeded_generator
from chatglm_sft.infer.sampling import SamplingParams, most_likely, next_tokens
from chatglm_sft.serve.batch import Batch, BatchRunner
from chatglm_sft.serve.metrics import Metrics

log = logging.getLogger("chatglm_sft.serve")


class QueueFull(Exception):
    """Too many requests are waiting or running."""


@dataclass
class Job:
    """One request as the scheduler sees it, and the channel its results go back to the event loop by."""

    id: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    adapter: str | None = None
    """Name of the LoRA adapter the request asked for (None: the base model)."""
    model: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """("delta", text) events, then one ("done", finish_reason) or ("error", message)."""
    cancelled: bool = False
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    """The generated ids (without the stop token): tool calls are read from them, reply segments kept apart."""
    submitted: float = field(default_factory=time.perf_counter)
    created: float = field(default_factory=time.time)
    first_token: float | None = None

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        """The client left: the row stops at the next step (no effect once finished)."""
        self.cancelled = True


class Scheduler:
    """What both schedulers share: the bounded queue, the worker thread, and how a request ends."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 8,
        max_queue: int = 64,
        metrics: Metrics | None = None,
        uses_adapters: bool = False,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.uses_adapters = uses_adapters
        """Whether rows name their LoRA adapter to the model (a PEFT model with several adapters)."""
        self._waiting: queue.Queue[Job] = queue.Queue()
        self._in_system = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="chatglm-sft-decoder", daemon=True)
        self._thread.start()

    @property
    def in_system(self) -> int:
        return self._in_system

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._in_system >= self.max_queue:
                raise QueueFull
            self._in_system += 1
        self.metrics.waiting.inc()
        self.metrics.prompt_tokens.inc(len(job.prompt))
        self._waiting.put(job)
        return job

    def _work(self) -> None:
        raise NotImplementedError

    def _started(self, job: Job) -> None:
        """The job left the queue for the batch."""
        self.metrics.waiting.dec()
        self.metrics.running.inc()

    def _token(self, job: Job, delta: str) -> None:
        if job.first_token is None:
            job.first_token = time.perf_counter()
            self.metrics.ttft.observe(job.first_token - job.submitted)
        if delta:
            job.emit("delta", delta)

    def _finish(self, job: Job, reason: str, running: bool = True, error: str | None = None) -> None:
        """The job's last event, the gauges and counters, and its one log line."""
        with self._lock:
            self._in_system -= 1
        (self.metrics.running if running else self.metrics.waiting).dec()
        total = time.perf_counter() - job.submitted
        self.metrics.finished.labels(reason=reason if error is None else "error").inc()
        self.metrics.generation_tokens.inc(job.completion_tokens)
        self.metrics.latency.observe(total)
        record = {
            "event": "request",
            "id": job.id,
            "family": self.engine.family.name,
            "model": job.model,
            "prompt_tokens": len(job.prompt),
            "completion_tokens": job.completion_tokens,
            "ttft_s": round(job.first_token - job.submitted, 4) if job.first_token else None,
            "total_s": round(total, 4),
            "finish_reason": reason if error is None else "error",
        }
        log.info(json.dumps(record, ensure_ascii=False))
        job.emit("error", error) if error is not None else job.emit("done", reason)

    def _fail(self, job: Job, e: Exception, running: bool = True) -> None:
        log.error("request %s failed in the engine", job.id, exc_info=e)
        self._finish(job, "error", running, error=f"{type(e).__name__}: {e}")


class StaticScheduler(Scheduler):
    """Dynamic batching: the requests waiting together are decoded together until the longest ends."""

    def _work(self) -> None:
        while True:
            batch = [self._waiting.get()]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            for job in batch:
                self._started(job)
            live = []
            for job in batch:
                if job.cancelled:
                    self._finish(job, "cancelled")
                else:
                    live.append(job)
            if live:
                self._decode(live)

    def _decode(self, batch: list[Job]) -> None:
        rows = Rows(self.engine, [job.params for job in batch])
        adapters = [job.adapter for job in batch] if self.uses_adapters else None
        try:
            steps = self.engine.decode_steps([job.prompt for job in batch], rows.params, adapters=adapters)
            for n, step in enumerate(steps, start=1):
                self.metrics.batch_size.observe(len(batch))
                for row, job in enumerate(batch):
                    if job.cancelled and rows.reasons[row] is None:
                        rows.end(row, "cancelled")
                        self._finish(job, "cancelled")
                for row, delta, reason in rows.advance(step.tolist(), n):
                    job = batch[row]
                    job.completion_tokens = len(rows.texts[row].ids)
                    job.token_ids = rows.texts[row].ids
                    self._token(job, delta)
                    if reason is not None:
                        self._finish(job, reason)
                if rows.done:
                    break
        except Exception as e:  # a failed batch must not take the server down: report it to its requests
            for row, job in enumerate(batch):
                if rows.reasons[row] is None:
                    self._fail(job, e)


@dataclass
class _Row:
    """A request in the continuous batch."""

    job: Job
    rows: Rows
    """Its decoding state (text, stop rules, budget), a batch of one."""
    generator: torch.Generator | None
    last: int = -1
    """The last token chosen, fed at the next step."""
    part: Batch | None = None
    """Its cache while a long prompt is read chunk by chunk."""

    @property
    def read(self) -> int:
        return self.part.mask.shape[1] if self.part is not None else 0


class ContinuousScheduler(Scheduler):
    """Iteration-level scheduling: requests join and leave the running batch at every decode step."""

    def __init__(self, engine: Engine, *args, prefill_chunk: int = 512, **kwargs):
        self.prefill_chunk = prefill_chunk
        """Most prompt tokens read per step."""
        self.runner = BatchRunner(engine, adapter_names=kwargs.get("uses_adapters", False))
        self.batch: Batch | None = None
        self.running: list[_Row] = []
        self.joining: deque[_Row] = deque()
        super().__init__(engine, *args, **kwargs)

    def _work(self) -> None:
        while True:
            try:
                self._iteration()
            except Exception as e:  # a bug here must not leave requests hanging: end every row in flight
                log.error("scheduler iteration failed", exc_info=e)
                for row in self.running + list(self.joining):
                    self._fail(row.job, e)
                self.batch, self.running = None, []
                self.joining.clear()

    def _iteration(self) -> None:
        self._admit(block=not self.running and not self.joining)
        self._drop_cancelled()
        self._prefill()
        if self.running:
            self._decode()

    def _admit(self, block: bool) -> None:
        """Take waiting requests while there is room in the batch (waiting for one when idle)."""
        while len(self.running) + len(self.joining) < self.max_batch_size:
            try:
                job = self._waiting.get(timeout=0.5) if block else self._waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            self._started(job)
            rows = Rows(self.engine, [job.params])
            self.joining.append(_Row(job, rows, seeded_generator(job.params.seed, self.engine.device)))

    def _drop_cancelled(self) -> None:
        for row in [r for r in self.joining if r.job.cancelled]:
            self.joining.remove(row)
            self._finish(row.job, "cancelled")
        gone = [i for i, r in enumerate(self.running) if r.job.cancelled]
        for i in gone:
            self._finish(self.running[i].job, "cancelled")
        if gone:
            self._keep([i for i in range(len(self.running)) if i not in gone])

    def _keep(self, indices: list[int]) -> None:
        self.batch = self.runner.keep(self.batch, indices)
        self.running = [self.running[i] for i in indices]

    def _prefill(self) -> None:
        """Read up to `prefill_chunk` prompt tokens of joining requests: whole short prompts together as one
        batch, a long prompt a chunk at a time on its own (whole, where it cannot be read in pieces)."""
        budget, whole = self.prefill_chunk, []
        while self.joining and budget > 0:
            row = self.joining[0]
            rest = len(row.job.prompt) - row.read
            if rest <= budget and row.part is None:
                whole.append(self.joining.popleft())
                budget -= rest
            elif whole:
                break  # the next one reads on the next step
            elif self.runner.chunkable:
                self._read_chunk(row, min(rest, budget))
                break
            else:
                whole.append(self.joining.popleft())
                break
        if whole:
            self._prefill_whole(whole)

    def _read_chunk(self, row: _Row, length: int) -> None:
        upto = row.read + length
        try:
            row.part, logits = self.runner.extend(row.part, row.job.prompt, upto, row.job.adapter)
        except Exception as e:
            self.joining.remove(row)
            self._fail(row.job, e)
            return
        if upto == len(row.job.prompt):
            self.joining.remove(row)
            self._join([row], row.part, logits)
            row.part = None

    def _prefill_whole(self, rows: list[_Row]) -> None:
        try:
            part, logits = self.runner.prefill([r.job.prompt for r in rows], [r.job.adapter for r in rows])
        except Exception as e:
            if len(rows) > 1:  # find the request that fails: each alone
                for row in rows:
                    self._prefill_whole([row])
                return
            self._fail(rows[0].job, e)
            return
        self._join(rows, part, logits)

    def _join(self, rows: list[_Row], part: Batch, logits: torch.Tensor) -> None:
        """Rows whose prompt is read: choose their first token, and those still going join the batch."""
        ended = self._choose(rows, logits)
        keep = [i for i in range(len(rows)) if i not in ended]
        if not keep:
            return
        part = self.runner.keep(part, keep) if ended else part
        self.batch = self.runner.join(self.batch, part)
        self.running += [rows[i] for i in keep]

    def _decode(self) -> None:
        self.metrics.batch_size.observe(len(self.running))
        try:
            logits = self.runner.step(self.batch, [r.last for r in self.running])
        except Exception as e:
            for row in self.running:
                self._fail(row.job, e)
            self.batch, self.running = None, []
            return
        ended = self._choose(self.running, logits)
        if ended:
            self._keep([i for i in range(len(self.running)) if i not in ended])

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> set[int]:
        """Each row's next token and text; returns the rows that ended (finished or failed)."""
        tokens = self._plain_greedy(rows, logits)
        ended = set()
        for i, row in enumerate(rows):
            try:
                token = tokens[i] if tokens[i] is not None else self._sample(row, logits[i : i + 1])
                row.last = token
                (_, delta, reason), *_ = row.rows.advance([token], len(row.rows.texts[0].ids) + 1)
            except Exception as e:
                self._fail(row.job, e)
                ended.add(i)
                continue
            row.job.completion_tokens = len(row.rows.texts[0].ids)
            row.job.token_ids = row.rows.texts[0].ids
            self._token(row.job, delta)
            if reason is not None:
                self._finish(row.job, reason)
                ended.add(i)
        return ended

    @staticmethod
    def _plain_greedy(rows: list[_Row], logits: torch.Tensor) -> list[int | None]:
        """Tokens of the rows that are greedy without a penalty, in one argmax; None for the others."""
        plain = [r.job.params.greedy and r.job.params.repetition_penalty == 1.0 for r in rows]
        if not any(plain):
            return [None] * len(rows)
        best = most_likely(logits).tolist()
        return [b if p else None for b, p in zip(best, plain, strict=True)]

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        seen = torch.tensor([row.job.prompt + row.rows.texts[0].ids], device=logits.device)
        return int(next_tokens(logits, row.job.params, seen, row.generator)[0])


def make_scheduler(kind: str, engine: Engine, **options) -> Scheduler:
    """`continuous` (default) or `static`."""
    if kind == "static":
        options.pop("prefill_chunk", None)
        return StaticScheduler(engine, **options)
    return ContinuousScheduler(engine, **options)
