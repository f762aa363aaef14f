"""ChatGLM-6B (v1) in one file, with THUDM's parameter names so their checkpoints load as they are.

Read top to bottom: config, positions and masks, rotary embedding, attention, MLP, block, model. What makes v1
unlike the later GLMs (see ``../shared/reference/NOTES.md`` in development):

* post-LN "DeepNorm" blocks whose residual carries the *normalised* input scaled by alpha = sqrt(2 * 28): THUDM's
  `GLMBlock` takes ``num_layers=28`` as a default its model never overrides, so alpha is that of the 6B model
  whatever the depth (the tiny goldens confirm it; `deepnorm_layers` in the config keeps it adjustable);
* a fused ``query_key_value`` interleaved per head (rows of head i: q_i, k_i, v_i);
* 2D rotary positions: the first half of each head is rotated by the token position (which stops at the [gMASK]
  index once the answer starts), the second half by the block position (0 in the prompt, 1, 2, ... from <sop>);
* a prefix-LM mask: everything before <sop> sees everything before <sop>; from <sop> on it is causal.

Padding is always on the left; pads are masked out and do not count as positions, so a padded batch gives every
row the logits it gets alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from chatglm_sft.batches import answer_cross_entropy
from chatglm_sft.models.prefix import PrefixEncoder, prefixed_cache


class ChatGLMv1Config(PretrainedConfig):
    """THUDM's `ChatGLMConfig` for ChatGLM-6B, under its own model type so it never shadows remote code."""

    model_type = "chatglm_v1"
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length"}

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        inner_hidden_size: int = 16384,
        layernorm_epsilon: float = 1e-5,
        max_sequence_length: int = 2048,
        bos_token_id: int = 130004,
        eos_token_id: int = 130005,
        pad_token_id: int = 3,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        deepnorm_layers: int = 28,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size
        self.layernorm_epsilon = layernorm_epsilon
        self.max_sequence_length = max_sequence_length
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.deepnorm_layers = deepnorm_layers
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Positions and masks, derived from the ids exactly as THUDM's `get_position_ids` / `get_masks` do.


def _real_start(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Index of the first real (non-pad) token per row; pads are on the left."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (attention_mask[:, -length:] == 0).sum(dim=1)


def _first_index(hits: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first True in `hits`, or `default` where there is none."""
    length = hits.shape[1]
    idx = torch.arange(length, device=hits.device).expand_as(hits)
    first = torch.where(hits, idx, length).min(dim=1).values
    return torch.where(first < length, first, default)


def context_lengths(input_ids: torch.Tensor, config: ChatGLMv1Config) -> torch.Tensor:
    """Index of the first <sop> per row (the end of the bidirectional context); the row length if there is none."""
    full = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
    return _first_index(input_ids == config.bos_token_id, full)


def position_ids_from_ids(
    input_ids: torch.Tensor, config: ChatGLMv1Config, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, 2, L] positions: (token position, block position) per token; pads get (0, 0)."""
    batch, length = input_ids.shape
    device = input_ids.device
    start = _real_start(attention_mask, batch, length, device)
    ctx = context_lengths(input_ids, config)
    # The reference clamps to the first [gMASK] if the row has one anywhere, else to the first [MASK].
    gmask = _first_index(input_ids == config.gmask_token_id, torch.full_like(ctx, -1))
    mask = _first_index(input_ids == config.mask_token_id, ctx)
    mask_pos = torch.where(gmask >= 0, gmask, mask)
    idx = torch.arange(length, device=device).unsqueeze(0)
    after_ctx = idx >= ctx.unsqueeze(1)
    token_pos = torch.where(after_ctx, (mask_pos - start).unsqueeze(1), idx - start.unsqueeze(1))
    block_pos = torch.where(after_ctx, idx - ctx.unsqueeze(1) + 1, 0)
    is_pad = idx < start.unsqueeze(1)
    positions = torch.stack([token_pos.masked_fill(is_pad, 0), block_pos.masked_fill(is_pad, 0)], dim=1)
    return positions.clamp(min=0)


def prefix_lm_mask(
    input_ids: torch.Tensor,
    config: ChatGLMv1Config,
    attention_mask: torch.Tensor | None,
    past_length: int,
) -> torch.Tensor:
    """Boolean [B, 1, Lq, Lk] mask, True where a query may attend to a key.

    Prompt tokens (before <sop>) see the whole prompt; from <sop> on attention is causal. Query tokens that
    continue a cache are past the prompt, so they are causal. Pad keys are hidden; pad queries see themselves
    only, which keeps their (ignored) outputs finite.
    """
    batch, q_len = input_ids.shape
    k_len = past_length + q_len
    device = input_ids.device
    q_idx = torch.arange(past_length, k_len, device=device).view(1, q_len, 1)
    k_idx = torch.arange(k_len, device=device).view(1, 1, k_len)
    if past_length == 0:
        ctx = context_lengths(input_ids, config).view(batch, 1, 1)
    else:
        ctx = torch.zeros(batch, 1, 1, dtype=torch.long, device=device)
    allowed = (k_idx <= q_idx) | (k_idx < ctx)
    if attention_mask is not None:
        key_real = attention_mask[:, -k_len:].bool().view(batch, 1, k_len)
        query_real = attention_mask[:, -q_len:].bool().view(batch, q_len, 1)
        allowed = (allowed & key_real & query_real) | ((k_idx == q_idx) & ~query_real)
    return allowed.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# Rotary embedding (rotate-half convention, applied separately to each half of a head).


def rotary_inv_freq(head_dim: int, device=None) -> torch.Tensor:
    """THUDM rounds the frequencies through fp16 before use; we do the same so fp32 logits match theirs."""
    dim = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return inv_freq.half().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, 1, L, rot] for integer positions [B, L]."""
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_2d_rotary(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of each head by token positions, the second half by block positions."""
    x1, x2 = x.chunk(2, dim=-1)
    cos1, sin1 = _rotary_cos_sin(position_ids[:, 0], inv_freq, x.dtype)
    cos2, sin2 = _rotary_cos_sin(position_ids[:, 1], inv_freq, x.dtype)
    x1 = x1 * cos1 + _rotate_half(x1) * sin1
    x2 = x2 * cos2 + _rotate_half(x2) * sin2
    return torch.cat((x1, x2), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Layers.


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, position_ids, attn_mask, inv_freq, cache: Cache | None):
        batch, length, _ = x.shape
        # Rows are interleaved per head: [q_0 k_0 v_0 q_1 k_1 v_1 ...], each head_dim wide.
        qkv = self.query_key_value(x).view(batch, length, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q = apply_2d_rotary(q, position_ids, inv_freq)
        k = apply_2d_rotary(k, position_ids, inv_freq)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int):
        super().__init__()
        self.alpha = math.sqrt(2 * config.deepnorm_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden_states, position_ids=None, attn_mask=None, inv_freq=None, cache=None, use_cache=False):
        attn_input = self.input_layernorm(hidden_states)
        hidden_states = attn_input * self.alpha + self.attention(attn_input, position_ids, attn_mask, inv_freq, cache)
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


class ChatGLMv1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLMv1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ChatGLMv1Model(ChatGLMv1PreTrainedModel):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.prefix_encoder = self._prefix_encoder(config) if config.pre_seq_len else None
        self.gradient_checkpointing = False
        self.post_init()

    @staticmethod
    def _prefix_encoder(config: ChatGLMv1Config) -> PrefixEncoder:
        heads = config.num_attention_heads
        return PrefixEncoder(
            config.pre_seq_len,
            config.num_layers,
            heads,
            config.hidden_size // heads,
            config.hidden_size,
            config.prefix_projection,
            projection_input=config.hidden_size,
        )

    def enable_prefix(self, pre_seq_len: int, projection: bool) -> None:
        """Add a fresh P-Tuning v2 prefix encoder (THUDM's `transformer.prefix_encoder`)."""
        self.config.pre_seq_len, self.config.prefix_projection = pre_seq_len, projection
        self.prefix_encoder = self._prefix_encoder(self.config).to(self.word_embeddings.weight.device)

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        prefix = 0
        if self.prefix_encoder is not None:  # P-Tuning v2: the prefix's keys and values head the cache
            cache = prefixed_cache(self.prefix_encoder, cache, input_ids.shape[0], self.word_embeddings.weight.dtype)
            prefix = self.prefix_encoder.pre_seq_len
        past_length = cache.get_seq_length() - prefix if cache is not None else 0
        full_mask = attention_mask is not None and attention_mask.dim() == 4
        padding_mask = None if full_mask else attention_mask
        if position_ids is None:
            if past_length:
                raise ValueError("ChatGLM-6B needs explicit position_ids when continuing from a cache")
            position_ids = position_ids_from_ids(input_ids, self.config, padding_mask)
        if full_mask:
            attn_mask = ~attention_mask.bool()  # THUDM's 4-D convention: True = masked
        else:
            attn_mask = prefix_lm_mask(input_ids, self.config, padding_mask, past_length)
        if prefix:  # every token sees the whole prefix
            head = torch.ones(*attn_mask.shape[:-1], prefix, dtype=torch.bool, device=attn_mask.device)
            attn_mask = torch.cat([head, attn_mask.expand(input_ids.shape[0], -1, -1, -1)], dim=-1)
        inv_freq = rotary_inv_freq(self.config.hidden_size // self.config.num_attention_heads, input_ids.device)
        hidden_states = self.word_embeddings(input_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_ids=position_ids,
                attn_mask=attn_mask,
                inv_freq=inv_freq,
                cache=cache,
                use_cache=use_cache,
            )
        return self.final_layernorm(hidden_states)


class ChatGLMv1ForCausalLM(ChatGLMv1PreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__(config)
        self.transformer = ChatGLMv1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache is None:  # a training step has no use for a cache
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden_states = self.transformer(input_ids, attention_mask, position_ids, cache, use_cache)
        if not isinstance(logits_to_keep, int) or logits_to_keep:  # an int keeps the last n; see transformers
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = answer_cross_entropy(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # --- generation: 2-D positions live in model_kwargs as [B, 2, L]; a new token keeps the [gMASK] position and
    # counts its block position on, as THUDM's `prepare_inputs_for_generation` does.

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return position_ids_from_ids(inputs_tensor, self.config, model_kwargs.get("attention_mask"))

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        positions = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if positions is not None:
            steps = torch.arange(1, num_new_tokens + 1, device=positions.device)
            new = torch.stack([positions[:, 0, -1:].expand(-1, num_new_tokens), positions[:, 1, -1:] + steps], 1)
            model_kwargs["position_ids"] = torch.cat([positions, new], dim=-1)
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # transformers takes 3-D positions for [3, B, L] (M-RoPE); ours are [B, 2, L], batch first.
        positions = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if positions is not None:
            model_kwargs["position_ids"] = positions.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs


# Registering is how transformers' Auto classes learn a model type: it only adds names to their tables, so that
# `AutoModelForCausalLM.from_pretrained` opens folders saved from this class once chatglm_sft is imported.
AutoConfig.register(ChatGLMv1Config.model_type, ChatGLMv1Config, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMv1Config, ChatGLMv1ForCausalLM, exist_ok=True)


def next_position_ids(last: torch.Tensor) -> torch.Tensor:
    """Positions [B, 2, 1] of the token after `last` ([B, 2, 1]): the token position stays, the block counts on."""
    return torch.stack([last[:, 0], last[:, 1] + 1], dim=1)
