"""An independent, literal re-statement of THUDM's ChatGLM2/GLM-4 forward pass (fp32, no cache), written from
their `modeling_chatglm.py` in its own [seq, batch, ...] style. Tests compare `GlmForCausalLM` after conversion
against it on shapes the shared goldens do not cover."""

from __future__ import annotations

import torch


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cache):
    # x: [sq, b, np, hn]; THUDM rotates the first half of hn in adjacent pairs (2i, 2i+1).
    sq, rot = x.size(0), cache.shape[-2] * 2
    x, x_pass = x[..., :rot], x[..., rot:]
    xshaped = x.reshape(sq, -1, x.size(2), rot // 2, 2)
    c = cache[:sq].view(sq, -1, 1, xshaped.size(3), 2)
    out = torch.stack(
        [
            xshaped[..., 0] * c[..., 0] - xshaped[..., 1] * c[..., 1],
            xshaped[..., 1] * c[..., 0] + xshaped[..., 0] * c[..., 1],
        ],
        -1,
    ).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


def thudm_glm_logits(config: dict, state: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    s = {k: v.float() for k, v in state.items()}
    eps, heads, d = config["layernorm_epsilon"], config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"]
    sq = input_ids.shape[1]
    base = 10000 * config.get("rope_ratio", 1)
    dim = d // 2
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    idx_theta = torch.outer(torch.arange(sq, dtype=torch.float), theta)
    cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)[:, None]  # [sq, 1, rot/2, 2]
    h = s["transformer.embedding.word_embeddings.weight"][input_ids].transpose(0, 1)  # [sq, b, H]
    mask = torch.ones(sq, sq, dtype=torch.bool).tril()
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms(h, s[p + "input_layernorm.weight"], eps)
        qkv = x @ s[p + "self_attention.query_key_value.weight"].T + s[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q = _rope(q.view(sq, -1, heads, d), cache)
        k = _rope(k.view(sq, -1, groups, d), cache)
        v = v.view(sq, -1, groups, d)
        k = k.repeat_interleave(heads // groups, dim=2)
        v = v.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / d**0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        ctx = torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(sq, -1, heads * d)
        h = h + ctx @ s[p + "self_attention.dense.weight"].T
        x = _rms(h, s[p + "post_attention_layernorm.weight"], eps)
        gate, up = (x @ s[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * up) @ s[p + "mlp.dense_4h_to_h.weight"].T
    h = _rms(h, s["transformer.encoder.final_layernorm.weight"], eps)
    return (h @ s["transformer.output_layer.weight"].T).transpose(0, 1)
