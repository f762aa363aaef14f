"""Multi-turn chat over the engine: templates from the registry, history, the official response clean-up."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from chatglm_sft.conversation import encode_conversation
from chatglm_sft.errors import UserError
from chatglm_sft.families import Family
from chatglm_sft.infer.engine import Engine, PrefixCache
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.tools.formats import check_tools

_PUNCTUATION = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")]


def clean_response(text: str, family: Family) -> str:
    """THUDM's `process_response`: strip, the training-time placeholder, and ChatGLM-6B's full-width punctuation."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    if family.fullwidth_punctuation:
        for half, full in _PUNCTUATION:
            half = re.escape(half)
            text = re.sub(rf"([\u4e00-\u9fff]){half}", rf"\1{full}", text)
            text = re.sub(rf"{half}([\u4e00-\u9fff])", rf"{full}\1", text)
    return text


def load_tools(path: str | Path, family: Family) -> list[dict]:
    """The tools of `chat --tools`: a JSON list of OpenAI function tools, for a family that has a tool format."""
    if family.tool_format is None:
        raise UserError(f"--tools: {family.name} has no tool-calling format")
    try:
        return check_tools(json.loads(Path(path).read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


class ChatSession:
    """One conversation. `send` streams the reply and records it; the KV cache carries over between turns where
    the architecture allows it (not under ChatGLM-6B's prefix-LM mask)."""

    def __init__(
        self, engine: Engine, params: SamplingParams, system: str | None = None, tools: list[dict] | None = None
    ):
        self.engine = engine
        self.params = params
        self.system = system
        self.tools = tools
        self.history: list[dict] = []
        self._cache = PrefixCache()

    def clear(self) -> None:
        self.history = []
        self._cache = PrefixCache()

    def messages_for(self, query: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": query}]

    def send(self, query: str) -> Iterator[str]:
        """Yield the cleaned reply in pieces; the whole reply joins the history at the end."""
        messages = self.messages_for(query)
        prompt = encode_conversation(self.engine.tokenizer, messages, add_generation_prompt=True).input_ids
        raw, shown = "", ""
        for delta in self.engine.stream(prompt, self.params, self._cache):
            raw += delta
            cleaned = clean_response(raw, self.engine.family)
            if cleaned.startswith(shown) and len(cleaned) > len(shown):
                yield cleaned[len(shown) :]
                shown = cleaned
        final = clean_response(raw, self.engine.family)
        if final.startswith(shown) and len(final) > len(shown):
            yield final[len(shown) :]
        self.history += [{"role": "user", "content": query}, {"role": "assistant", "content": final}]

    def reply_to(self, turns: list[dict]) -> dict:
        """With tools: add `turns` (a user message, or the results of the last calls as ``role: "tool"`` messages)
        and return the assistant's message, text or calls; it joins the history. Not streamed: a call is only
        known to be one once it is complete."""
        self.history += turns
        head = [{"role": "system", "content": self.system}] if self.system else []
        tokenizer = self.engine.tokenizer
        prompt = encode_conversation(tokenizer, head + self.history, add_generation_prompt=True, tools=self.tools)
        [generation] = self.engine.generate([prompt.input_ids], self.params)
        message = self.engine.message(generation, self.tools)
        self.history.append(message)
        return message
