"""The generation engine: prompts as token ids in, generated ids and text out.

One loop serves batches and streams: prefill a left-padded batch with the KV cache, then decode a token at a time.
Positions come from the model's architecture record (ChatGLM-6B's 2D positions differ from the GLMs' 1D ones), so
every row of a batch computes what it computes alone. Generation stops on the family's stop ids, on user stop
strings, or at `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from chatglm_sft.families import Family, get_family
from chatglm_sft.infer.sampling import SamplingParams, next_tokens
from chatglm_sft.models.architectures import architecture_of


@dataclass
class PrefixCache:
    """A single conversation's KV cache and the ids it holds, reused when the next prompt extends them."""

    cache: DynamicCache | None = None
    ids: list[int] | None = None


@dataclass
class Generation:
    """One prompt's result."""

    token_ids: list[int]
    """Generated ids, without the stop token."""
    text: str
    """Decoded text, cut before any stop string."""
    finish_reason: str
    """``stop`` (stop token or string) or ``length``."""
    prompt_tokens: int


class Engine:
    """Generate with a loaded model and its tokenizer (see `chatglm_sft.load_model` / `load_tokenizer`)."""

    def __init__(self, model, tokenizer, family: Family | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family or get_family(model.config.chatglm_sft_family)
        self.arch = architecture_of(self.family)
        self.stop_ids = set(self.family.stop_ids)
        self.device = next(model.parameters()).device

    # --- low level: token ids -------------------------------------------------------------------------------------

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.family.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def decode_steps(
        self, prompts: list[list[int]], params: SamplingParams, reuse: PrefixCache | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B]) step by step; the caller decides when to stop.

        With `reuse` (one prompt, an architecture whose cache stays valid as the prompt grows), the part of the
        prompt already in the cache is not computed again.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ids, mask = self._batch(prompts)
        positions = self.arch.first_positions(self.model.config, ids, mask)
        seen = ids.masked_fill(mask == 0, -1)
        cache, inputs, fed = DynamicCache(), ids, list(prompts[0])
        if reuse is not None and len(prompts) == 1 and self.arch.reuses_prefix_cache and reuse.cache is not None:
            keep = min(_common_prefix(reuse.ids, prompts[0]), len(prompts[0]) - 1)
            cache = reuse.cache
            if cache.get_seq_length() > keep:
                cache.crop(keep - cache.get_seq_length())
            inputs, positions = ids[:, keep:], positions[..., keep:]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        for _ in range(params.max_new_tokens):
            out = self.model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            if reuse is not None:
                reuse.cache, reuse.ids = cache, list(fed)
            token = next_tokens(out.logits[:, -1], params, seen, generator)
            yield token
            inputs = token[:, None]
            fed.append(int(token[0]))
            seen = torch.cat([seen, inputs], dim=1)
            mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)
            positions = self.arch.next_positions(positions[..., -1:])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Generate for a batch of prompts; greedy rows equal their single-prompt results."""
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        reasons = ["length"] * len(prompts)
        for step in self.decode_steps(prompts, params):
            for row, token in enumerate(step.tolist()):
                if done[row]:
                    continue
                if token in self.stop_ids:
                    done[row], reasons[row] = True, "stop"
                    continue
                outputs[row].append(token)
                if params.stop and self._stop_index(self._text(outputs[row]), params.stop) is not None:
                    done[row], reasons[row] = True, "stop"
            if all(done):
                break
        results = []
        for row, ids in enumerate(outputs):
            text = self._text(ids)
            cut = self._stop_index(text, params.stop)
            results.append(Generation(ids, text if cut is None else text[:cut], reasons[row], len(prompts[row])))
        return results

    def stream(self, prompt: list[int], params: SamplingParams, reuse: PrefixCache | None = None) -> Iterator[str]:
        """Yield text deltas for one prompt. A delta never ends inside a multi-byte character, and text that
        could be the start of a stop string is held back until it is not."""
        ids: list[int] = []
        sent = 0
        for step in self.decode_steps([prompt], params, reuse):
            token = int(step[0])
            if token in self.stop_ids:
                break
            ids.append(token)
            text = self._text(ids)
            cut = self._stop_index(text, params.stop)
            if cut is not None:
                if cut > sent:
                    yield text[sent:cut]
                return
            if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its other bytes
                continue
            ready = len(text) - self._held_back(text, params.stop)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        text = self._text(ids)
        if len(text) > sent:
            yield text[sent:]

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
        hits = [text.find(s) for s in stops if s and s in text]
        return min(hits) if hits else None

    @staticmethod
    def _held_back(text: str, stops: tuple[str, ...]) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def _common_prefix(a: list[int] | None, b: list[int]) -> int:
    n = 0
    for x, y in zip(a or [], b, strict=False):
        if x != y:
            break
        n += 1
    return n
