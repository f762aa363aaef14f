"""The generation engine and chat on tiny checkpoints of each family with family-shaped tokenizers."""

from __future__ import annotations

import pytest
import torch

import chatglm_sft
from chatglm_sft.conversation import encode_conversation
from chatglm_sft.families import get_family
from chatglm_sft.infer.chat import ChatSession, clean_response
from chatglm_sft.infer.engine import Engine
from chatglm_sft.infer.sampling import SamplingParams

FAMILIES = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engines: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in engines:
            folder = tiny_checkpoint(family)
            engines[family] = Engine(chatglm_sft.load_model(folder), chatglm_sft.load_tokenizer(folder))
        return engines[family]

    return get


def prompts(eng, queries):
    return [
        encode_conversation(eng.tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True).input_ids
        for q in queries
    ]


QUERIES = ["你好", "请详细介绍一下长城的历史，越详细越好，包括修建的朝代和原因", "1+1="]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single(engine, family):
    eng = engine(family)
    params = SamplingParams(max_new_tokens=10)
    batch = eng.generate(prompts(eng, QUERIES), params)
    for query, result in zip(QUERIES, batch, strict=True):
        alone = eng.generate(prompts(eng, [query]), params)[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text
    assert any(r.token_ids for r in batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_transformers_generate(engine, family):
    eng = engine(family)
    prompt = prompts(eng, ["你好"])[0]
    ours = eng.generate([prompt], SamplingParams(max_new_tokens=8)).pop()
    ref = eng.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    stop = [i for i, t in enumerate(ref) if t in eng.stop_ids]
    assert ours.token_ids == ref[: stop[0] if stop else None]


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_equals_generate(engine, family):
    eng = engine(family)
    for prompt in prompts(eng, QUERIES):
        params = SamplingParams(max_new_tokens=16)
        deltas = list(eng.stream(prompt, params))
        assert "".join(deltas) == eng.generate([prompt], params)[0].text
        assert all(d and "\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_strings_cut_text_in_both_paths(engine, family):
    eng = engine(family)
    prompt = prompts(eng, ["你好"])[0]
    full = eng.generate([prompt], SamplingParams(max_new_tokens=16))[0].text
    assert len(full) >= 4, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    params = SamplingParams(max_new_tokens=16, stop=(stop,))
    result = eng.generate([prompt], params)[0]
    assert result.text == full[: full.find(stop)] and result.finish_reason == "stop"
    assert "".join(eng.stream(prompt, params)) == result.text


class Scripted(torch.nn.Module):
    """A model whose next tokens are forced to `script` (then the family's end token): the real model still runs,
    so the cache and positions are exercised, but its last logits are overridden."""

    def __init__(self, model, script: list[int], end: int):
        super().__init__()
        self.model, self.config, self.script, self.end, self.calls = model, model.config, script, end, 0

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        token = self.script[self.calls] if self.calls < len(self.script) else self.end
        self.calls += 1
        out.logits[:, -1] = -1e4
        out.logits[:, -1, token] = 1e4
        return out


@pytest.mark.parametrize("family", ["chatglm2-6b", "glm-4-9b-chat"])  # byte fallback / byte-level BPE
def test_streamed_characters_spanning_several_tokens_arrive_whole(engine, family):
    eng = engine(family)
    text = "好龘, ok 😀!"
    for char in "龘😀":
        assert len(eng.tokenizer.encode_plain(char)) >= 3  # each character is spelled in byte tokens
    script = eng.tokenizer.encode_plain(text)
    scripted = Engine(Scripted(eng.model, script, eng.family.eos_id), eng.tokenizer)
    deltas = list(scripted.stream(prompts(eng, ["你好"])[0], SamplingParams(max_new_tokens=len(script) + 1)))
    assert "".join(deltas) == eng.tokenizer.decode(script, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any("龘" in d for d in deltas) and any("😀" in d for d in deltas)
    assert len(deltas) < len(script)  # the tokens inside a character produced no delta of their own


def test_sampled_stream_equals_sampled_generate(engine):
    eng = engine("glm-4-9b-chat")
    for prompt in prompts(eng, QUERIES[:2]):
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
        assert "".join(eng.stream(prompt, params)) == eng.generate([prompt], params)[0].text


def count_computed_tokens(model) -> tuple[list[int], object]:
    """A list that receives the number of input tokens of each forward call of `model`, and the hook's handle."""
    computed: list[int] = []

    def hook(module, args, kwargs):
        computed.append(kwargs["input_ids"].shape[1])

    return computed, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_reuses_the_cache_where_the_architecture_allows(engine, family):
    eng = engine(family)
    params = SamplingParams(max_new_tokens=8)
    session = ChatSession(eng, params)
    first = "".join(session.send("你好"))
    first_prompt = encode_conversation(eng.tokenizer, session.history[:1], add_generation_prompt=True).input_ids
    second_prompt = encode_conversation(
        eng.tokenizer, session.messages_for("再说一次"), add_generation_prompt=True
    ).input_ids
    computed, handle = count_computed_tokens(eng.model)
    try:
        second = "".join(session.send("再说一次"))
    finally:
        handle.remove()
    assert len(session.history) == 4 and session.history[1]["content"] == first
    if eng.arch.reuses_prefix_cache:
        # The first turn's prompt is in the cache: only what follows it is computed again.
        assert 0 < computed[0] <= len(second_prompt) - len(first_prompt) + 1
    else:  # ChatGLM-6B's prefix-LM mask sees ahead, so a grown prompt is computed whole
        assert computed[0] == len(second_prompt)
    assert computed[1:] == [1] * (len(computed) - 1)  # then one token per step
    # The second turn equals a fresh generation from the full history (no stale cache).
    prompt = encode_conversation(eng.tokenizer, session.history[:3], add_generation_prompt=True).input_ids
    assert second == clean_response(eng.generate([prompt], params)[0].text, eng.family)


def test_a_changed_history_is_not_served_from_the_stale_cache(engine):
    eng = engine("chatglm2-6b")
    params = SamplingParams(max_new_tokens=8)
    session = ChatSession(eng, params)
    "".join(session.send("你好"))
    session.history[1]["content"] = "被改过的回答"  # e.g. a client editing the assistant's reply
    computed, handle = count_computed_tokens(eng.model)
    try:
        reply = "".join(session.send("再说一次"))
    finally:
        handle.remove()
    prompt = encode_conversation(eng.tokenizer, session.history[:3], add_generation_prompt=True).input_ids
    assert reply == clean_response(eng.generate([prompt], params)[0].text, eng.family)
    assert computed[0] > 1


def test_chatglm6b_punctuation_cleanup():
    fam = get_family("chatglm-6b")
    assert clean_response(" 你好,世界!ok, fine ", fam) == "你好，世界！ok, fine"
    assert clean_response(" 你好,世界! ", get_family("chatglm2-6b")) == "你好,世界!"
