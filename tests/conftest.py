"""Shared fixtures: tiny checkpoints of every family and training data that the project generates itself (so behaviour
tests run on a bare clone), and the reference material in ../shared for the golden comparisons (skipped with a reason
when absent)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chatglm_sft.demo.problems import make_problems
from chatglm_sft.families import get_family
from chatglm_sft.models.synthetic import write_tiny_checkpoint
from chatglm_sft.tokenization.synthetic import sample_texts

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "reference" / "tiny"
MODELS = SHARED / "reference" / "models"
TOKENIZE = SHARED / "reference" / "tokenize"
DATA = SHARED / "data"


_CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config):
    """A tokenizer cache of this test session's own (see chatglm_sft.tokenization.cache): tests never read entries
    that another version of the code wrote, and the subprocesses they start share it."""
    config.stash[_CACHE_KEY] = os.environ["CHATGLM_SFT_CACHE"] = tempfile.mkdtemp(prefix="chatglm-sft-test-cache-")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread per xdist worker (and per process it starts): two workers with torch's default of one thread
        # per core oversubscribe the cores, and OpenMP's spinning threads then made steps several times slower.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config):
    """Remove this session's tokenizer cache: every run made a new one (25 MB), and a machine that runs the suite
    often filled its disk with them."""
    if _CACHE_KEY in config.stash:
        shutil.rmtree(config.stash[_CACHE_KEY], ignore_errors=True)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m chatglm_sft ARGS` in a real subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "chatglm_sft", *args], capture_output=True, text=True, **kw)


def train_in_processes(processes: int, *args: str) -> subprocess.CompletedProcess:
    """`chatglm-sft train ARGS` in one process, or under torchrun in `processes` (as users launch a sharded run);
    a failed run fails the calling test with the launcher's error lines first. DeepSpeed runs go through
    `tests/cli_without_deepspeed_shm.py` (the same CLI, without compiling an op the tests do not need)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cli_module = "tests.cli_without_deepspeed_shm" if "deepspeed" in args else "chatglm_sft"
    result = subprocess.run([*launcher, "-m", cli_module, "train", *args], capture_output=True, text=True)
    if result.returncode != 0:
        noteworthy = [line for line in result.stderr.splitlines() if "rror" in line or "terminate" in line]
        pytest.fail("\n".join([*noteworthy[:40], result.stderr[-3000:]]))
    return result


def need_shared(path: Path) -> Path:
    """Skip the calling test when the reference material is missing (a user's fresh clone has no ../shared)."""
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (it lives in ../shared beside the project)")
    return path


@pytest.fixture
def shared():
    return need_shared(SHARED)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family, **shape) -> Path`: a complete THUDM-layout folder of `family` ("chatglm-6b",
    "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat") with random weights and a family-shaped tokenizer, built once per
    session for each distinct set of arguments (see `chatglm_sft.models.synthetic.write_tiny_checkpoint` for the shape
    options, e.g. ``kv_groups=1``). Shared by every test: copy it before changing anything in it."""
    built: dict[str, Path] = {}

    def make(family: str, **shape) -> Path:
        name = get_family(family).name
        key = name + "".join(f"-{k}={v}" for k, v in sorted(shape.items()))
        if key not in built:
            folder = tmp_path_factory.mktemp("tiny") / name
            built[key] = write_tiny_checkpoint(folder, name, **shape)
        return built[key]

    return make


def alpaca_records(count: int = 40, seed: int = 0) -> list[dict]:
    """Alpaca-style records, Chinese and English, some with an `input`: arithmetic word problems with their worked
    answers and generated sentences to repeat."""
    rng = random.Random(seed)
    records = []
    for i, (problem, text) in enumerate(zip(make_problems(count, seed), sample_texts(count, seed), strict=True)):
        if i % 2 == 0:
            records.append({"instruction": problem["question"], "input": "", "output": problem["solution"]})
        else:
            instruction = rng.choice(["Repeat the text.", "复述下面的内容。", "Copy this sentence:"])
            records.append({"instruction": instruction, "input": text, "output": text})
    return records


@pytest.fixture(scope="session")
def tiny_alpaca(tmp_path_factory) -> Path:
    """A JSON file of 40 generated alpaca-style records (see `alpaca_records`) for training and evaluation tests."""
    path = tmp_path_factory.mktemp("data") / "tiny_alpaca.json"
    path.write_text(json.dumps(alpaca_records(), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def thudm_glm_config(
    hidden=48,
    heads=6,
    kv_channels=8,
    groups=2,
    layers=3,
    ffn=80,
    vocab=65024,
    rope_ratio=None,
    eps=1e-5,
    seq_length=256,
) -> dict:
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "ffn_hidden_size": ffn,
        "hidden_size": hidden,
        "kv_channels": kv_channels,
        "layernorm_epsilon": eps,
        "multi_query_attention": True,
        "multi_query_group_num": groups,
        "num_attention_heads": heads,
        "num_layers": layers,
        "original_rope": True,
        "padded_vocab_size": vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": seq_length,
        "torch_dtype": "float16",
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if rope_ratio:
        config["rope_ratio"] = rope_ratio
    return config


def random_thudm_glm_state(config: dict, seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, d = config["hidden_size"], config["kv_channels"]
    qkv = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * d

    def rnd(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    state = {
        "transformer.embedding.word_embeddings.weight": rnd(config["padded_vocab_size"], h, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, d // 2, 2) / (d // 2))).to(dtype),
    }
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        state |= {
            p + "input_layernorm.weight": (1 + rnd(h)),
            p + "self_attention.query_key_value.weight": rnd(qkv, h),
            p + "self_attention.query_key_value.bias": rnd(qkv),
            p + "self_attention.dense.weight": rnd(h, config["num_attention_heads"] * d),
            p + "post_attention_layernorm.weight": (1 + rnd(h)),
            p + "mlp.dense_h_to_4h.weight": rnd(2 * config["ffn_hidden_size"], h),
            p + "mlp.dense_4h_to_h.weight": rnd(h, config["ffn_hidden_size"]),
        }
    state["transformer.encoder.final_layernorm.weight"] = 1 + rnd(h)
    state["transformer.output_layer.weight"] = rnd(config["padded_vocab_size"], h)
    return state


def write_checkpoint(
    folder: Path, config: dict, state: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 2
) -> Path:
    """Write `state` in THUDM's sharded layout (`.bin` via torch.save, or safetensors) with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = {n: state[n].contiguous() for n in names[k * per : (k + 1) * per]}
        if fmt == "bin":
            file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, folder / file)
        else:
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
