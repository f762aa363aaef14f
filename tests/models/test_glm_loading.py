"""ChatGLM2/3 and GLM-4 on transformers' `GlmForCausalLM`: exact against THUDM's outputs, strict loading, export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GlmForCausalLM

import chatglm_sft
from chatglm_sft.errors import UserError
from chatglm_sft.models.checkpoint import iter_shards
from chatglm_sft.models.export import export_model
from tests.conftest import TINY, need_shared, random_thudm_glm_state, thudm_glm_config, write_checkpoint
from tests.models.thudm_reference import thudm_glm_logits

GLM_TINY = ["chatglm2-6b-tiny", "glm-4-9b-chat-tiny"]


def expand_logits(expected: dict, prefix: str, logits: torch.Tensor) -> tuple[float, float, bool]:
    """Compare full logits with the compact golden form: (max abs diff at the stored columns, logsumexp diff,
    argmax equal)."""
    at_cols = logits[..., expected["logit_cols"]]
    diff = (at_cols - expected[f"{prefix}_logits_at_cols"]).abs().max().item()
    lse = (torch.logsumexp(logits.float(), -1) - expected[f"{prefix}_logits_logsumexp"]).abs().max().item()
    argmax = torch.equal(logits.argmax(-1), expected[f"{prefix}_logits_argmax"])
    return diff, lse, argmax


@pytest.mark.parametrize("name", GLM_TINY)
def test_goldens(name):
    folder = need_shared(TINY / name)
    expected = load_file(folder / "expected.safetensors")
    model = chatglm_sft.load_model(folder, dtype=torch.float32)
    assert isinstance(model, GlmForCausalLM)
    with torch.no_grad():
        diff, lse, argmax = expand_logits(expected, "unpadded", model(expected["unpadded_input_ids"]).logits)
        assert diff <= 1e-4 and lse <= 1e-4 and argmax
        loss = model(expected["unpadded_input_ids"], labels=expected["loss_labels"]).loss
        assert abs(loss.item() - expected["loss"].item()) <= 1e-5 * expected["loss"].item()
        out = model.generate(expected["greedy_prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[0, expected["greedy_prompt"].shape[1] :].tolist() == expected["greedy_tokens"].tolist()


def test_padded_golden_chatglm2():
    folder = need_shared(TINY / "chatglm2-6b-tiny")
    expected = load_file(folder / "expected.safetensors")
    model = chatglm_sft.load_model(folder, dtype=torch.float32)
    mask = expected["padded_attention_mask"]
    with torch.no_grad():
        logits = model(expected["padded_input_ids"], attention_mask=mask).logits
    real = mask.bool()
    diff = (logits[..., expected["logit_cols"]] - expected["padded_logits_at_cols"])[real].abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("fmt,rope_ratio", [("bin", None), ("safetensors", 500)])
def test_other_shapes_match_thudm_forward(tmp_path, fmt, rope_ratio):
    config = thudm_glm_config(
        hidden=40, heads=5, kv_channels=8, groups=1, layers=3, ffn=72, vocab=1000, rope_ratio=rope_ratio
    )
    state = random_thudm_glm_state(config, seed=3)
    folder = write_checkpoint(tmp_path / "m", config, state, fmt=fmt, shards=3)
    model = chatglm_sft.load_model(folder, dtype=torch.float32, family="chatglm2-6b")
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    assert (ours - thudm_glm_logits(config, state, ids)).abs().max().item() <= 1e-4


def test_left_padded_batch_rows_equal_single_rows(tmp_path):
    config = thudm_glm_config(vocab=500)
    folder = write_checkpoint(tmp_path / "m", config, random_thudm_glm_state(config))
    model = chatglm_sft.load_model(folder, dtype=torch.float32, family="chatglm2-6b")
    long, short = torch.randint(1, 500, (1, 11)), torch.randint(1, 500, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        assert (logits[1, 6:] - model(short).logits[0]).abs().max() <= 1e-4
        assert (logits[0] - model(long).logits[0]).abs().max() <= 1e-4
        greedy = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        single = model.generate(short, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert greedy[1, 11:].tolist() == single[0, 5:].tolist()


def _broken_copy(tmp_path, name="broken", drop=None, add=None):
    config = thudm_glm_config(vocab=300)
    state = random_thudm_glm_state(config)
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    return write_checkpoint(tmp_path / name, config, state)


def _export_cli(model, output):
    command = [sys.executable, "-m", "chatglm_sft", "export", "--model", str(model), "--family", "chatglm2-6b"]
    return subprocess.run([*command, "--output", str(output)], capture_output=True, text=True)


def test_missing_tensor_is_named(tmp_path):
    name = "transformer.encoder.layers.1.self_attention.query_key_value.bias"
    folder = _broken_copy(tmp_path, drop=name)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        chatglm_sft.load_model(folder, family="chatglm2-6b")


def test_unexpected_tensor_is_named(tmp_path):
    folder = _broken_copy(tmp_path, add="transformer.encoder.layers.0.extra.weight")
    with pytest.raises(UserError, match=r"transformer\.encoder\.layers\.0\.extra\.weight"):
        chatglm_sft.load_model(folder, family="chatglm2-6b")


def test_cli_errors_are_one_line(tmp_path):
    missing_tensor = _broken_copy(tmp_path, drop="transformer.output_layer.weight")
    (missing_tensor / "tokenizer_config.json").write_text("{}")
    truncated = _broken_copy(tmp_path, name="truncated")
    shard = truncated / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    missing_shard = _broken_copy(tmp_path, name="missing_shard")
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    for i, model in enumerate([missing_tensor, tmp_path / "absent", truncated, missing_shard]):
        run = _export_cli(model, tmp_path / f"out{i}")
        assert run.returncode != 0
        assert "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "output_layer" in _export_cli(missing_tensor, tmp_path / "o").stderr


@pytest.mark.parametrize("family", ["chatglm2-6b", "glm-4-9b-chat"])
def test_export_hf_then_thudm_round_trip(tmp_path, tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    hf, back = tmp_path / "hf", tmp_path / "back"
    run = subprocess.run(
        [sys.executable, "-m", "chatglm_sft", "export", "--model", str(folder), "--output", str(hf)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["GlmForCausalLM"]
    plain = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    ours = chatglm_sft.load_model(folder, dtype=torch.float32)
    ids = torch.tensor([[3, 50, 700, 9000, 12, 64000 % plain.config.vocab_size]])
    with torch.no_grad():
        assert (plain(ids).logits - ours(ids).logits).abs().max() <= 1e-5
    stop = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    assert stop == ours.generation_config.eos_token_id
    export_model(hf, back, fmt="thudm")
    original = {k: v for shard in iter_shards(folder) for k, v in shard.items()}
    restored = {k: v for shard in iter_shards(back) for k, v in shard.items()}
    assert set(original) == set(restored)
    for k, v in original.items():
        assert v.dtype == restored[k].dtype and torch.equal(v, restored[k]), k
    assert chatglm_sft.load_model(back).config.chatglm_sft_family == ours.config.chatglm_sft_family


def test_loading_peak_memory_near_checkpoint_size(tmp_path):
    """A ~200 MB fp16 checkpoint loads with peak RSS growth <= 1.3x its size (measured in a fresh process)."""
    config = thudm_glm_config(hidden=512, heads=8, kv_channels=64, groups=2, layers=8, ffn=1376, vocab=65024)
    folder = write_checkpoint(tmp_path / "big", config, random_thudm_glm_state(config), shards=4)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    # VmHWM, not ru_maxrss: the latter survives exec and would report the (large) pytest parent's peak.
    script = (
        "import sys, torch, chatglm_sft\n"
        "from chatglm_sft.models import loading, chatglm_v1\n"
        "from transformers import GlmForCausalLM, GenerationConfig\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))\n"
        "before = status('VmRSS')\n"
        "m = chatglm_sft.load_model(sys.argv[1], family='chatglm2-6b')\n"
        "total = sum(float(p.sum()) for p in m.parameters())  # touch every weight\n"
        "print(status('VmHWM') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {size / 2**20:.0f} MiB, peak RSS growth {growth / 2**20:.0f} MiB, ratio {growth / size:.2f}")
    assert growth <= 1.3 * size
