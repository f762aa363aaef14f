"""P-Tuning v2: learned keys and values for `pre_seq_len` virtual tokens in every attention layer.

THUDM's layout (``NOTES.md``): an embedding of `pre_seq_len` rows, optionally through Linear -> Tanh -> Linear
(`prefix_projection`), viewed as [pre_seq_len, layers * 2, kv heads, head_dim]; layer i takes its keys at 2i and
values at 2i+1. The prefix keys carry no rotary embedding, every real token attends to all of them, real positions
still start at 0, and dropout (0.1) applies to the prefix while training. The base model stays frozen.

The prefix enters through the KV cache: when a forward pass starts with an empty cache, the prefix fills it first,
so `generate`, our engine, batches and the cache all work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GlmForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class PrefixEncoder(nn.Module):
    """THUDM's `PrefixEncoder` (parameter names `embedding`, `trans.0`, `trans.2`)."""

    def __init__(
        self,
        pre_seq_len: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        hidden_size: int,
        projection: bool,
        projection_input: int | None = None,
    ):
        super().__init__()
        self.pre_seq_len, self.layers, self.kv_heads, self.head_dim = pre_seq_len, layers, kv_heads, head_dim
        kv_size = layers * 2 * kv_heads * head_dim
        if projection:
            width = projection_input or kv_size
            self.embedding = nn.Embedding(pre_seq_len, width)
            self.trans = nn.Sequential(nn.Linear(width, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)
            self.trans = None
        self.dropout = nn.Dropout(0.1)

    def fill(self, cache: DynamicCache, batch: int, dtype: torch.dtype) -> None:
        """Put every layer's prefix keys and values ([batch, kv heads, pre_seq_len, head_dim]) into `cache`."""
        x = self.embedding.weight
        if self.trans is not None:
            x = self.trans(x)
        x = self.dropout(x.view(self.pre_seq_len, self.layers * 2, self.kv_heads, self.head_dim).to(dtype))
        x = x.permute(1, 2, 0, 3)  # [layers * 2, kv heads, P, d]
        for i in range(self.layers):
            keys = x[2 * i].unsqueeze(0).expand(batch, -1, -1, -1)
            values = x[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(keys, values, i)


def prefixed_cache(encoder: PrefixEncoder, cache, batch: int, dtype) -> DynamicCache:
    """`cache`, or a new one, holding the prefix (filled only when it is empty)."""
    cache = cache if cache is not None else DynamicCache()
    if cache.get_seq_length() == 0:
        encoder.fill(cache, batch, dtype)
    return cache


class GlmPrefixForCausalLM(GlmForCausalLM):
    """`GlmForCausalLM` with a P-Tuning v2 prefix (ChatGLM2/3, GLM-4)."""

    def __init__(self, config):
        super().__init__(config)
        self.prefix_encoder = PrefixEncoder(
            config.pre_seq_len,
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            config.hidden_size,
            bool(getattr(config, "prefix_projection", False)),
        )

    @classmethod
    def from_base(cls, model: GlmForCausalLM, pre_seq_len: int, projection: bool) -> GlmPrefixForCausalLM:
        """Give a loaded `GlmForCausalLM` a (fresh) prefix encoder, keeping its weights."""
        model.config.pre_seq_len, model.config.prefix_projection = pre_seq_len, projection
        c = model.config
        encoder = PrefixEncoder(
            pre_seq_len, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.hidden_size, projection
        )
        model.__class__ = cls  # same modules and weights, plus the prefix
        model.prefix_encoder = encoder.to(device=model.lm_head.weight.device)
        return model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        batch, length = input_ids.shape
        # The embeddings' dtype: the output layer may be quantized, the embeddings never are.
        cache = prefixed_cache(self.prefix_encoder, cache, batch, self.get_input_embeddings().weight.dtype)
        prefix = self.prefix_encoder.pre_seq_len
        past = cache.get_seq_length() - prefix
        real = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -(past + length) :]
        if position_ids is None:
            position_ids = (real.cumsum(-1) - 1).clamp(min=0)[:, -length:]
        if attention_mask is None or attention_mask.dim() == 2:
            attention_mask = _prefix_causal_mask(real, prefix, past, length)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True if use_cache is None else use_cache,
            **kwargs,
        )
        if use_cache is False:  # the prefix needed a cache inside; the caller asked for none back
            return CausalLMOutputWithPast(
                loss=out.loss, logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions
            )
        return out


def _prefix_causal_mask(real: torch.Tensor, prefix: int, past: int, length: int) -> torch.Tensor:
    """[B, 1, L, prefix + past + L] (True: may attend): every prefix key, then causal over real, unpadded keys."""
    batch = real.shape[0]
    q = torch.arange(past, past + length, device=real.device).view(1, length, 1)
    k = torch.arange(past + length, device=real.device).view(1, 1, past + length)
    allowed = (k <= q) & real.bool().view(batch, 1, -1)
    pad_query = ~real[:, -length:].bool().view(batch, length, 1)
    allowed = allowed | ((k == q) & pad_query)  # pads attend to themselves: finite, ignored
    head = torch.ones(batch, length, prefix, dtype=torch.bool, device=real.device)
    return torch.cat([head, allowed], dim=-1).unsqueeze(1)
