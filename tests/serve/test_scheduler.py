"""The schedulers in-process on the generated tiny checkpoints: continuous batching equals each request alone for
all four families, cancelled rows leave at once, and a failure ends only the rows it concerns."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.serve import scheduler as scheduler_module
from chatglm_sft.serve.scheduler import ContinuousScheduler, Job, StaticScheduler

FAMILIES = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]
QUERIES = [
    "你好",
    "请详细介绍一下长城的历史，越详细越好，包括修建的朝代和原因，以及它在今天的意义",
    "1+1=",
    "Tell me a story about a cat",
    "写一首诗",
    "What is the capital of France? Answer in one word please.",
]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    built: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in built:
            folder = tiny_checkpoint(family)
            model = chatglm_sft.load_model(folder, dtype=torch.float32)
            built[family] = Engine(model, chatglm_sft.load_tokenizer(folder))
        return built[family]

    return get


def prompt_of(engine: Engine, query: str) -> list[int]:
    messages = [{"role": "user", "content": query}]
    return encode_conversation(engine.tokenizer, messages, add_generation_prompt=True).input_ids


def new_job(name: str, prompt: list[int], params: SamplingParams) -> Job:
    return Job(id=name, prompt=prompt, params=params, loop=asyncio.get_running_loop())


async def outcome(job: Job, timeout: float = 120) -> tuple[str, str, str]:
    """(text, last event kind, finish reason or error message) of a job."""
    text = ""
    while True:
        kind, value = await asyncio.wait_for(job.events.get(), timeout)
        if kind == "delta":
            text += value
        else:
            return text, kind, value


async def started(job: Job) -> None:
    """Wait until the job has its first token (it is in the running batch)."""
    for _ in range(24_000):
        if job.first_token is not None:
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(job.id)


def sample(sched, name: str) -> float:
    return sched.metrics.registry.get_sample_value(name)


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_equals_each_request_alone(engines, family):
    engine = engines(family)
    budgets = [24, 6, 16, 3, 30, 10]
    prompts = [prompt_of(engine, q) for q in QUERIES]
    assert max(len(p) for p in prompts) > 16  # one prompt is read in chunks (where the family allows it)
    params = [SamplingParams(max_new_tokens=n) for n in budgets]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    sched = ContinuousScheduler(engine, max_batch_size=3, max_queue=16, prefill_chunk=16)

    async def run():
        jobs = [sched.submit(new_job(f"r{i}", prompts[i], params[i])) for i in range(2)]
        await started(jobs[0])  # the batch is decoding: the others join it step by step
        jobs += [sched.submit(new_job(f"r{i}", prompts[i], params[i])) for i in range(2, len(prompts))]
        return [await outcome(job) for job in jobs]

    results = asyncio.run(run())
    for (text, kind, reason), expected in zip(results, alone, strict=True):
        assert kind == "done" and text == expected.text and reason == expected.finish_reason
    assert sched.in_system == 0
    assert sample(sched, "chatglm_sft_requests_running") == 0 == sample(sched, "chatglm_sft_requests_waiting")
    steps, rows = sample(sched, "chatglm_sft_batch_size_count"), sample(sched, "chatglm_sft_batch_size_sum")
    assert rows > steps  # rows did share steps


@pytest.mark.parametrize("kind", [ContinuousScheduler, StaticScheduler])
def test_cancelled_request_stops_and_frees_its_slot(engines, kind):
    engine = engines("chatglm2-6b")
    sched = kind(engine, max_batch_size=4, max_queue=2)
    long_params, short_params = SamplingParams(max_new_tokens=200), SamplingParams(max_new_tokens=3)

    async def run():
        long = sched.submit(new_job("long", prompt_of(engine, "讲一个很长的故事"), long_params))
        short = sched.submit(new_job("short", prompt_of(engine, "你好"), short_params))
        await started(long)
        long.cancel()
        return await outcome(long), await outcome(short), long.completion_tokens

    (_, _, long_reason), (_, _, short_reason), generated = asyncio.run(run())
    assert (long_reason, short_reason) == ("cancelled", "length")
    assert generated < 200 and sched.in_system == 0
    assert sample(sched, "chatglm_sft_requests_running") == 0


def test_seeded_rows_each_draw_from_their_own_generator(engines):
    engine = engines("chatglm2-6b")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=7)
    prompts = [prompt_of(engine, q) for q in QUERIES[:3]]
    alone = [engine.generate([p], params)[0].text for p in prompts]
    sched = ContinuousScheduler(engine, max_batch_size=4)

    async def run():
        jobs = [sched.submit(new_job(f"s{i}", p, params)) for i, p in enumerate(prompts)]
        return [(await outcome(job))[0] for job in jobs]

    assert asyncio.run(run()) == alone


def test_a_failing_row_ends_alone_and_is_logged(engines, monkeypatch, caplog):
    engine = engines("chatglm2-6b")
    real = scheduler_module.next_tokens

    def broken_for_seed_13(logits, params, seen, generator=None):
        if params.seed == 13:
            raise FloatingPointError("sampling blew up")
        return real(logits, params, seen, generator)

    monkeypatch.setattr(scheduler_module, "next_tokens", broken_for_seed_13)
    good = SamplingParams(max_new_tokens=8)
    prompts = [prompt_of(engine, q) for q in QUERIES[:3]]
    alone = [engine.generate([p], good)[0].text for p in prompts]
    sched = ContinuousScheduler(engine, max_batch_size=4)

    async def run():
        jobs = [sched.submit(new_job(f"good{i}", p, good)) for i, p in enumerate(prompts[:2])]
        bad = sched.submit(new_job("bad-request-id", prompts[0], SamplingParams(temperature=1.0, seed=13)))
        jobs.append(sched.submit(new_job("good2", prompts[2], good)))
        return [await outcome(job) for job in jobs], await outcome(bad)

    with caplog.at_level(logging.INFO, logger="chatglm_sft.serve"):
        goods, bad = asyncio.run(run())
    assert [text for text, _, _ in goods] == alone and all(kind == "done" for _, kind, _ in goods)
    assert bad[1] == "error" and "sampling blew up" in bad[2]
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failure) == 1 and "bad-request-id" in failure[0].getMessage() and failure[0].exc_info
    assert sched.in_system == 0


def test_failed_forward_ends_its_rows_and_the_server_goes_on(engines, monkeypatch, caplog):
    engine = engines("chatglm2-6b")
    sched = ContinuousScheduler(engine, max_batch_size=4)
    real_step, real_prefill = sched.runner.step, sched.runner.prefill
    poisoned = prompt_of(engine, "poison")
    calls = {"step": 0}

    def failing_step(batch, tokens):
        calls["step"] += 1
        if calls["step"] == 2:
            raise RuntimeError("CUDA error: device-side assert")
        return real_step(batch, tokens)

    def failing_prefill(prompts, adapters):
        if poisoned in prompts:
            raise RuntimeError("prefill failed")
        return real_prefill(prompts, adapters)

    monkeypatch.setattr(sched.runner, "step", failing_step)
    monkeypatch.setattr(sched.runner, "prefill", failing_prefill)
    params = SamplingParams(max_new_tokens=6)
    prompt = prompt_of(engine, "你好")

    async def run():
        first = [sched.submit(new_job(f"a{i}", prompt, params)) for i in range(2)]
        failed = [await outcome(job) for job in first]
        group = [sched.submit(new_job(n, p, params)) for n, p in (("ok", prompt), ("poison", poisoned))]
        return failed, [await outcome(job) for job in group]

    with caplog.at_level(logging.ERROR, logger="chatglm_sft.serve"):
        failed, (ok, poison) = asyncio.run(run())
    assert all(kind == "error" and "device-side assert" in value for _, kind, value in failed)
    assert poison[1] == "error" and "prefill failed" in poison[2]
    assert ok[1] == "done" and ok[0] == engine.generate([prompt], params)[0].text
    assert sched.in_system == 0
    assert any("poison" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm2-6b"])
def test_p_tuning_prefix_rows_equal_each_request_alone(tiny_checkpoint, family):
    """A P-Tuning v2 prefix heads every row's cache: padding goes after it when rows join."""
    from chatglm_sft.families import get_family
    from chatglm_sft.models.architectures import architecture_of

    folder = tiny_checkpoint(family)
    torch.manual_seed(0)
    model = architecture_of(get_family(family)).add_prefix(
        chatglm_sft.load_model(folder, dtype=torch.float32), 4, False
    )
    engine = Engine(model.eval(), chatglm_sft.load_tokenizer(folder))
    prompts = [prompt_of(engine, q) for q in QUERIES[:4]]
    params = [SamplingParams(max_new_tokens=n) for n in (12, 4, 9, 14)]
    alone = [engine.generate([p], sp)[0].text for p, sp in zip(prompts, params, strict=True)]
    sched = ContinuousScheduler(engine, max_batch_size=2, prefill_chunk=16)

    async def run():
        jobs = [sched.submit(new_job(f"p{i}", p, sp)) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        return [(await outcome(job))[0] for job in jobs]

    assert asyncio.run(run()) == alone
