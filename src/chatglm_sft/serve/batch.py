"""The running batch of the continuous scheduler: rows that decode together, joined and left at any step.

The rows share one left-padded KV cache. A row that joins is prefilled on its own (or with the others joining at the
same step) and its cache is padded on the left to the batch's length; a row that leaves is dropped from the cache,
and columns that only padding still holds are cut. Pads are masked out and do not count as positions, so every row
computes what it computes alone: under greedy decoding in float32 each request gets its single-request output.

Positions come from the architecture record, so ChatGLM-6B's 2-D positions are served the same way. A P-Tuning v2
prefix heads every row's cache; padding goes after it, where the models expect the real tokens to begin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from chatglm_sft.infer.engine import Engine


@dataclass
class Batch:
    """Rows decoding together; row i of every tensor is the same request."""

    cache: DynamicCache
    mask: torch.Tensor
    """[B, T]: 1 where the cache holds a real token of the row (the P-Tuning prefix is not counted)."""
    positions: torch.Tensor
    """Position ids of each row's last token: [B, 1], or [B, 2, 1] for 2-D positions."""
    adapters: list[str | None]
    """Each row's LoRA adapter (None: the base model)."""

    @property
    def size(self) -> int:
        return self.mask.shape[0]


class BatchRunner:
    """Prefill, decode one step, join and leave, over one engine's model."""

    def __init__(self, engine: Engine, adapter_names: bool = False):
        self.engine = engine
        self.model = engine.model
        self.arch = engine.arch
        self.head = getattr(engine.model.config, "pre_seq_len", None) or 0
        self.adapter_names = adapter_names
        """Whether the model takes per-row `adapter_names` (a PEFT model with several LoRA adapters)."""

    @property
    def chunkable(self) -> bool:
        """Whether a prompt may be read in pieces: not under ChatGLM-6B's prefix-LM mask, where earlier prompt
        tokens see later ones."""
        return self.arch.reuses_prefix_cache

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], adapters: list[str | None]) -> tuple[Batch, torch.Tensor]:
        """Read whole prompts as one left-padded batch; returns it and each row's next-token logits [B, V]."""
        ids, mask = self.engine._batch(prompts)
        positions = self.arch.first_positions(self.model.config, ids, mask)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, adapters)
        return Batch(cache, mask, positions[..., -1:], list(adapters)), logits

    @torch.inference_mode()
    def extend(
        self, part: Batch | None, prompt: list[int], upto: int, adapter: str | None
    ) -> tuple[Batch, torch.Tensor]:
        """Read `prompt[:upto]` of one request whose first tokens `part` already holds (chunked prefill)."""
        done = part.mask.shape[1] if part is not None else 0
        ids = torch.tensor([prompt[:upto]], dtype=torch.long, device=self.engine.device)
        mask = torch.ones_like(ids)
        positions = self.arch.first_positions(self.model.config, ids, mask)[..., done:]
        cache = part.cache if part is not None else DynamicCache()
        logits = self._forward(ids[:, done:], mask, positions, cache, [adapter])
        return Batch(cache, mask, positions[..., -1:], [adapter]), logits

    @torch.inference_mode()
    def step(self, batch: Batch, tokens: list[int]) -> torch.Tensor:
        """Feed each row's last sampled token; returns the next-token logits [B, V]."""
        inputs = torch.tensor(tokens, dtype=torch.long, device=self.engine.device)[:, None]
        batch.mask = torch.cat([batch.mask, torch.ones_like(inputs)], dim=1)
        batch.positions = self.arch.next_positions(batch.positions)
        return self._forward(inputs, batch.mask, batch.positions, batch.cache, batch.adapters)

    def join(self, a: Batch | None, b: Batch) -> Batch:
        """One batch of `a`'s rows then `b`'s, the shorter cache padded on the left (after any prefix)."""
        if a is None:
            return b
        width = max(a.mask.shape[1], b.mask.shape[1])
        layers = []
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            keys = torch.cat([self._pad(la.keys, width), self._pad(lb.keys, width)])
            values = torch.cat([self._pad(la.values, width), self._pad(lb.values, width)])
            layers.append((keys, values))
        mask = torch.cat([_pad_left(a.mask, width), _pad_left(b.mask, width)])
        return Batch(_cache(layers), mask, torch.cat([a.positions, b.positions]), a.adapters + b.adapters)

    def keep(self, batch: Batch, rows: list[int]) -> Batch | None:
        """The batch of `rows` only (None if empty), without the columns that hold nothing but padding now."""
        if not rows:
            return None
        index = torch.tensor(rows, device=batch.mask.device)
        mask = batch.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column where some row has a real token
        cut = slice(self.head + start, None)
        layers = []
        for layer in batch.cache.layers:
            keys, values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            if start:
                keys = torch.cat([keys[:, :, : self.head], keys[:, :, cut]], dim=2)
                values = torch.cat([values[:, :, : self.head], values[:, :, cut]], dim=2)
            layers.append((keys, values))
        adapters = [batch.adapters[r] for r in rows]
        return Batch(_cache(layers), mask[:, start:], batch.positions.index_select(0, index), adapters)

    def _pad(self, states: torch.Tensor, width: int) -> torch.Tensor:
        """[B, H, head + T, D] -> [B, H, head + width, D] with zeros between the prefix and the tokens."""
        missing = self.head + width - states.shape[2]
        if missing == 0:
            return states
        zeros = states.new_zeros(states.shape[0], states.shape[1], missing, states.shape[3])
        return torch.cat([states[:, :, : self.head], zeros, states[:, :, self.head :]], dim=2)

    def _forward(self, ids, mask, positions, cache, adapters: list[str | None]) -> torch.Tensor:
        return self.engine.next_logits(ids, mask, positions, cache, adapters if self.adapter_names else None)


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache
