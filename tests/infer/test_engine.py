"""The generation engine and chat on the tiny reference checkpoints with their real tokenizers."""

from __future__ import annotations

import pytest
import torch

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.infer.chat import ChatSession, clean_response
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams
from tests.conftest import TINY, need_shared

TINY_MODELS = ["chatglm-6b-tiny", "chatglm2-6b-tiny", "glm-4-9b-chat-tiny"]
_engines: dict = {}


def engine(name) -> Engine:
    if name not in _engines:
        folder = need_shared(TINY / name)
        model = chatglm_sft.load_model(folder, dtype=torch.float32)
        _engines[name] = Engine(model, chatglm_sft.load_tokenizer(folder))
    return _engines[name]


def prompts(eng, queries):
    return [
        encode_conversation(eng.tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True).input_ids
        for q in queries
    ]


QUERIES = ["你好", "请详细介绍一下长城的历史，越详细越好，包括修建的朝代和原因", "1+1="]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batch_equals_single(name):
    eng = engine(name)
    params = SamplingParams(max_new_tokens=10)
    batch = eng.generate(prompts(eng, QUERIES), params)
    for query, result in zip(QUERIES, batch, strict=True):
        alone = eng.generate(prompts(eng, [query]), params)[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text


@pytest.mark.parametrize("name", TINY_MODELS)
def test_engine_matches_transformers_generate(name):
    eng = engine(name)
    prompt = prompts(eng, ["你好"])[0]
    ours = eng.generate([prompt], SamplingParams(max_new_tokens=8)).pop()
    ref = eng.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    stop = [i for i, t in enumerate(ref) if t in eng.stop_ids]
    assert ours.token_ids == ref[: stop[0] if stop else None]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_stream_equals_generate(name):
    eng = engine(name)
    for prompt in prompts(eng, QUERIES):
        params = SamplingParams(max_new_tokens=16)
        deltas = list(eng.stream(prompt, params))
        assert "".join(deltas) == eng.generate([prompt], params)[0].text
        assert all(d and "\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_stop_strings_cut_text_in_both_paths(name):
    eng = engine(name)
    prompt = prompts(eng, ["你好"])[0]
    full = eng.generate([prompt], SamplingParams(max_new_tokens=16))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    params = SamplingParams(max_new_tokens=16, stop=(stop,))
    result = eng.generate([prompt], params)[0]
    assert result.text == full[: full.find(stop)] and result.finish_reason == "stop"
    assert "".join(eng.stream(prompt, params)) == result.text


def test_multibyte_characters_never_split():
    eng = engine("glm-4-9b-chat-tiny")  # byte-level BPE: a CJK character can span several tokens
    for prompt in prompts(eng, QUERIES):
        for delta in eng.stream(prompt, SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)):
            assert "\ufffd" not in delta


@pytest.mark.parametrize("name", TINY_MODELS)
def test_chat_history_and_cache_reuse_give_plain_results(name):
    eng = engine(name)
    params = SamplingParams(max_new_tokens=8)
    session = ChatSession(eng, params)
    first = "".join(session.send("你好"))
    second = "".join(session.send("再说一次"))
    assert len(session.history) == 4 and session.history[1]["content"] == first
    # The second turn equals a fresh generation from the full history (no stale cache).
    prompt = encode_conversation(eng.tokenizer, session.history[:3], add_generation_prompt=True).input_ids
    assert second == clean_response(eng.generate([prompt], params)[0].text, eng.family)


def test_chatglm6b_punctuation_cleanup():
    fam = engine("chatglm-6b-tiny").family
    assert clean_response(" 你好,世界!ok, fine ", fam) == "你好，世界！ok, fine"
