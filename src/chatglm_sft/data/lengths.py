"""Token counts of a whole record file, on every CPU: the main process reads and checks the records while worker
processes tokenize them in chunks. Only the counts are kept, and only a few chunks are ever in flight, so memory
does not grow with the file."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.data.dataset import Tokenized

CHUNK = 512
"""Conversations per task: large enough that sending them costs little next to tokenizing them."""
PARALLEL_FROM_BYTES = 8 << 20
"""Smaller files are counted in this process: starting workers (a tokenizer each) costs a few seconds."""

_tokenizer = None  # one per worker process


def _load(model_dir: str, family: str) -> None:
    global _tokenizer
    import chatglm_sft

    _tokenizer = chatglm_sft.load_tokenizer(model_dir, family=family)


def _lengths(conversations: list[list[dict]]) -> list[int]:
    return [len(encode_conversation(_tokenizer, messages).input_ids) for messages in conversations]


def workers_for(path: str | Path) -> int:
    """Worker processes for a file: none (count here) for small files or one CPU, else one per CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus if cpus > 1 and Path(path).stat().st_size >= PARALLEL_FROM_BYTES else 0


class TokenCounter:
    """The `on_good(line, messages)` callback of `check_records` that counts each good record's tokens; `result()`
    gives them in file order as a `Tokenized` holding lengths only."""

    def __init__(self, model_dir: str | Path, family: str, max_length: int, workers: int = 0):
        self.max_length, self.workers = max_length, workers
        self.lengths: list[int] = []
        self.chunk: list[list[dict]] = []
        self.pending: deque[Future] = deque()
        self.pool = None
        if workers:
            self.pool = ProcessPoolExecutor(
                workers, mp_context=get_context("spawn"), initializer=_load, initargs=(str(model_dir), family)
            )
        else:
            _load(str(model_dir), family)

    def __call__(self, _line: int, messages: list[dict]) -> None:
        self.chunk.append(messages)
        if len(self.chunk) >= CHUNK:
            self._send()

    def _send(self) -> None:
        if not self.chunk:
            return
        if self.pool is None:
            self.lengths.extend(_lengths(self.chunk))
        else:
            self.pending.append(self.pool.submit(_lengths, self.chunk))
            while len(self.pending) > 2 * self.workers:  # bounded: the reader waits for the tokenizers
                self.lengths.extend(self.pending.popleft().result())
        self.chunk = []

    def result(self) -> Tokenized:
        self._send()
        while self.pending:
            self.lengths.extend(self.pending.popleft().result())
        if self.pool is not None:
            self.pool.shutdown()
        return Tokenized([], [], self.lengths, self.max_length)
