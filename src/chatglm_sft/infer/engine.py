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

from chatglm_sft.batches import left_pad_ids
from chatglm_sft.families import Family, get_family
from chatglm_sft.infer.sampling import SamplingParams, most_likely, next_tokens
from chatglm_sft.models.architectures import architecture_of
from chatglm_sft.models.cpu_activations import use_float32_activations
from chatglm_sft.models.huge_pages import use_huge_pages
from chatglm_sft.models.matvec import use_matvec_kernels
from chatglm_sft.tools import decode_reply, parse_reply


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
    """Generate with a loaded model and its tokenizer (see `chatglm_sft.load_model` / `load_tokenizer`).

    On the CPU the model's bf16 linear layers get a matrix-vector path for one-row inputs (in place:
    `chatglm_sft.models.matvec`), which is what a decode step at batch 1 is made of, and a quantized model computes
    its activations in float32 where the CPU has no bf16 arithmetic (`chatglm_sft.models.cpu_activations`); its
    large weights move into huge pages where the system gives those only on request (`chatglm_sft.models.huge_pages`).
    """

    def __init__(self, model, tokenizer, family: Family | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family or get_family(model.config.chatglm_sft_family)
        self.arch = architecture_of(self.family)
        self.stop_ids = set(self.family.stop_ids)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            use_matvec_kernels(model)
            use_float32_activations(model)
            use_huge_pages(model)

    # --- low level: token ids -------------------------------------------------------------------------------------

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad_ids(prompts, self.family.pad_id)  # the same left padding as training
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def next_logits(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        adapters: list[str | None] | None = None,
    ) -> torch.Tensor:
        """[B, V] logits of the token after each row; the model reads `ids` (the rows' new tokens) after what
        `cache` holds and extends it. `adapters` names each row's LoRA adapter (None: the base model) on a PEFT
        model that holds several; None: the model as it is."""
        extra = {"adapter_names": ["__base__" if a is None else a for a in adapters]} if adapters else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode_steps(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        reuse: PrefixCache | None = None,
        adapters: list[str | None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B]) step by step; the caller decides when to stop.

        With `reuse` (one prompt, an architecture whose cache stays valid as the prompt grows), the part of the
        prompt already in the cache is not computed again. `adapters` names each row's LoRA adapter (None: the
        base model) on a PEFT model that holds several.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ids, mask = self._batch(prompts)
        positions = self.arch.first_positions(self.model.config, ids, mask)
        seen = ids.masked_fill(mask == 0, -1)
        cache, inputs, fed = DynamicCache(), ids, list(prompts[0])
        reusable = self.arch.reuses_prefix_cache and not getattr(self.model.config, "pre_seq_len", None)
        if reuse is not None and len(prompts) == 1 and reusable and reuse.cache is not None:
            keep = min(_common_prefix(reuse.ids, prompts[0]), len(prompts[0]) - 1)
            cache = reuse.cache
            if cache.get_seq_length() > keep:
                cache.crop(keep - cache.get_seq_length())
            inputs, positions = ids[:, keep:], positions[..., keep:]
        rows = params if isinstance(params, list) else [params] * len(prompts)
        pick = _row_sampler(rows, self.device)
        for _ in range(max(p.max_new_tokens for p in rows)):
            logits = self.next_logits(inputs, mask, positions, cache, adapters)
            if reuse is not None:
                reuse.cache, reuse.ids = cache, list(fed)
            token = pick(logits, seen)
            yield token
            inputs = token[:, None]
            fed.append(int(token[0]))
            seen = torch.cat([seen, inputs], dim=1)
            mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)
            positions = self.arch.next_positions(positions[..., -1:])

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Generation]:
        """Generate for a batch of prompts; greedy rows equal their single-prompt results."""
        rows = Rows(self, params if isinstance(params, list) else [params] * len(prompts))
        for n, step in enumerate(self.decode_steps(prompts, rows.params), start=1):
            for _ in rows.advance(step.tolist(), n):
                pass
            if rows.done:
                break
        return [
            Generation(t.ids, t.text(), r or "length", len(p))
            for t, r, p in zip(rows.texts, rows.reasons, prompts, strict=True)
        ]

    def stream(self, prompt: list[int], params: SamplingParams, reuse: PrefixCache | None = None) -> Iterator[str]:
        """Yield text deltas for one prompt (see `TextStream`)."""
        rows = Rows(self, [params])
        for n, step in enumerate(self.decode_steps([prompt], params, reuse), start=1):
            for _, delta, _ in rows.advance(step.tolist(), n):
                if delta:
                    yield delta
            if rows.done:
                break

    def message(self, generation: Generation, tools: list[dict] | None = None) -> dict:
        """A generation as an OpenAI-style assistant message: its text, or the tool calls it makes in the family's
        format (only calls to `tools`, when given). Generation stops at ``<|observation|>``, where a call ends."""
        return parse_reply(self.family, decode_reply(self.tokenizer, generation.token_ids), tools)[0]


class Rows:
    """The decoding state of a batch's rows: each row's text so far and, once it has finished, why."""

    def __init__(self, engine: Engine, params: list[SamplingParams]):
        self.stop_ids = engine.stop_ids
        self.params = params
        self.texts = [TextStream(engine.tokenizer, p.stop) for p in params]
        self.reasons: list[str | None] = [None] * len(params)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def end(self, row: int, reason: str) -> None:
        """Finish a row from outside (e.g. its client left)."""
        self.reasons[row] = reason

    def advance(self, step: list[int], n: int) -> Iterator[tuple[int, str, str | None]]:
        """Feed the `n`-th decoded token of every unfinished row; yields (row, new text, finish reason or None)."""
        for row, token in enumerate(step):
            if self.reasons[row] is not None:
                continue
            text = self.texts[row]
            reason = self._finish_reason(text, token, n, self.params[row])
            self.reasons[row] = reason
            yield row, (text.take() if reason is None else text.finish()), reason

    def _finish_reason(self, text: TextStream, token: int, n: int, params: SamplingParams) -> str | None:
        if token in self.stop_ids:
            return "stop"
        text.push(token)
        if text.stopped:
            return "stop"
        return "length" if n >= params.max_new_tokens else None


class TextStream:
    """Incremental detokenisation of one row: deltas never end inside a multi-byte character, and text that could
    be the start of a stop string is held back until it cannot.

    Each token decodes only a window from the last complete piece on (as TGI and vLLM do), so a long reply costs
    linear, not quadratic, time; the new text is what the window adds to that piece's own decode.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self._longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._text = ""
        self._prefix = 0  # ids[_prefix:_read] is the last piece already in _text
        self._read = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        shown = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(window) <= len(shown) or window.endswith("\ufffd"):
            return  # nothing new yet, or an unfinished UTF-8 sequence: wait for the next token
        self._append(window[len(shown) :])

    def _append(self, new: str) -> None:
        before = len(self._text)
        self._text += new
        self._prefix, self._read = self._window_start(self._read), len(self.ids)
        if self.stops:
            tail = self._text[max(0, before - self._longest_stop) :]
            self.stopped = _stop_index(tail, self.stops) is not None

    def _window_start(self, i: int) -> int:
        """Where the next window may start: not at a token that decodes to whitespace only, since SentencePiece
        drops a text's leading spaces and the window would then lose spaces a whole-text decode keeps."""
        while i > 0 and not self.tokenizer.decode(self.ids[i : i + 1], skip_special_tokens=True).strip():
            i -= 1
        return i

    def text(self) -> str:
        cut = _stop_index(self._text, self.stops) if self.stops else None
        return self._text if cut is None else self._text[:cut]

    def take(self) -> str:
        """The text that is safe to show now and was not shown yet."""
        if self.stopped:
            return self.finish()
        ready = len(self._text) - _held_back(self._text, self.stops)
        return self._release(ready)

    def finish(self) -> str:
        """Whatever is left, cut before a stop string."""
        if self._read < len(self.ids):  # the last tokens ended inside a character: show what a full decode shows
            shown = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
            window = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
            self._append(window[len(shown) :])
        return self._release(len(self.text()))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self._text[self.sent : upto], upto
        return delta


def _row_sampler(rows: list[SamplingParams], device):
    """One function choosing every row's next token: batched when every row is plainly greedy, row by row
    otherwise, each sampling row with a generator of its own (rows that share a seed must not share draws)."""
    generators = [seeded_generator(p.seed, device) for p in rows]
    plain = all(p.greedy and p.repetition_penalty == 1.0 for p in rows)

    def pick(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        if plain:
            return most_likely(logits)
        return torch.cat(
            [next_tokens(logits[i : i + 1], p, seen[i : i + 1], generators[i]) for i, p in enumerate(rows)]
        )

    return pick


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator of the row's own for a seeded request (any int64 seed; torch takes them modulo 2**64)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % 2**64)


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


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
