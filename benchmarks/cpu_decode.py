"""CPU decoding side by side with chatglm.cpp: ours (bf16 / int8 / int4, through `Engine`) against its f16 / q8_0 /
q4_0, in one run, on the same threads.

One random-weights ChatGLM2-architecture checkpoint in THUDM's layout (hidden 4096, FFN 13696, 2 kv groups, the
real 65,024 vocabulary and the real ChatGLM2 tokenizer from ../shared), converted to chatglm.cpp's GGML format with
its own converter. Greedy, a 32-token prompt, --new-tokens tokens, batch 1 (ours also at batch 8). For each
precision both sides are loaded, then timed in alternating rounds (who goes first alternates) with the memory
bandwidth measured in every round; the figures are medians over the rounds. The weight-read bound is bytes read per
decode step / bandwidth. The last line is `ratio X` = our int4 tokens/s / chatglm.cpp q4_0 tokens/s at batch 1, the
median of the rounds' own ratios: the host's speed drifts from minute to minute, and the two sides of a round run
seconds apart, so a round's ratio compares them at one speed (a ratio of medians can pair a fast round of one side
with a slow one of the other).

    CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install chatglm-cpp==0.4.2 tabulate    # or: pip install -e '.[bench]'
    python benchmarks/cpu_decode.py [--quick] [--layers 4] [--rounds 5] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from decode import bandwidth  # benchmarks/decode.py: the same measure of the memory bandwidth

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "reference/models/chatglm2-6b"
PAIRS = (("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))
"""Our precision and chatglm.cpp's that reads about as many bytes per weight."""
GGML_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
"""Bytes per weight of each GGML type (q8_0: 32 int8 + an f16 scale per block; q4_0: 32 nibbles + an f16 scale)."""
PROMPT = (
    "请用三句话介绍一下大语言模型在中文对话中的应用，并举出一个具体的例子说明它的优点和局限。"
    "然后再用一句话总结：在一台只有两个处理器核心的电脑上，怎样才能让它回答得更快？"
)


def build_checkpoint(folder: Path, layers: int) -> Path:
    """The benchmark model (bf16, so chatglm.cpp's f16 holds the same weights) with the real tokenizer beside it."""
    from transformers import GlmForCausalLM

    from chatglm_sft.models.synthetic import chatglm2_config, write_thudm_checkpoint

    torch.manual_seed(0)
    model = GlmForCausalLM._from_config(chatglm2_config(4096, layers, 13696), dtype=torch.bfloat16).eval()
    write_thudm_checkpoint(model, folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, folder / name)
    return folder


class _Float32State(Mapping):
    """THUDM's tensors, handed to chatglm.cpp's quantizers one at a time in float32 (they compute scales in the
    tensor's dtype; bf16 scales would be coarser than the converter means them to be)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        for file in sorted(folder.glob("*.safetensors")):
            handle = safe_open(file, "pt")
            self.files |= dict.fromkeys(handle.keys(), handle)

    def __getitem__(self, name):
        return self.files[name].get_tensor(name).float()

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)


def convert_for_chatglm_cpp(folder: Path, ggml_type: str) -> tuple[Path, int]:
    """The checkpoint in chatglm.cpp's format through its own `ChatGLM2Converter`; returns the file and the bytes a
    decode step reads (every tensor but the embedding table)."""
    import sentencepiece
    from chatglm_cpp.convert import ChatGLM2Converter, GGMLType

    config = json.loads((folder / "config.json").read_text())
    state = _Float32State(folder)
    model = SimpleNamespace(config=SimpleNamespace(**config), state_dict=lambda: state)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = SimpleNamespace(tokenizer=SimpleNamespace(sp_model=sp))
    path = folder / f"chatglm-ggml-{ggml_type}.bin"
    with open(path, "wb") as f, contextlib.redirect_stdout(io.StringIO()):  # it prints a table of every tensor
        ChatGLM2Converter.convert(f, model, tokenizer, GGMLType[ggml_type.upper()])
    read = 0
    for name in state:
        if name.endswith("word_embeddings.weight"):
            continue
        shape = state.files[name].get_slice(name).get_shape()
        numel = int(torch.tensor(shape).prod())
        read += numel * GGML_BYTES[ggml_type if len(shape) == 2 else "f32"]
    return path, int(read)


class ChatglmCpp:
    """chatglm.cpp's pipeline, driven token by token like its own `Pipeline.generate` (greedy, no stop)."""

    def __init__(self, path: Path):
        import chatglm_cpp

        start = time.perf_counter()
        self.pipeline = chatglm_cpp.Pipeline(str(path))
        self.load_seconds = time.perf_counter() - start
        self.config = chatglm_cpp._C.GenerationConfig(max_length=4096, do_sample=False)

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, decode tokens/s, generated ids)."""
        model, ids = self.pipeline.model, list(prompt)
        start = time.perf_counter()
        ids.append(model.generate_next_token(ids, None, self.config, 0, len(prompt)))
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            ids.append(model.generate_next_token(ids, None, self.config, len(ids) - 1, len(prompt)))
        end = time.perf_counter()
        return first - start, (new_tokens - 1) / (end - first), ids[len(prompt) :]


class Ours:
    """chatglm-sft's `Engine` (the loop predict, chat and serve run), greedy, no stop."""

    def __init__(self, folder: Path, precision: str):
        import chatglm_sft
        from chatglm_sft.infer.engine import Engine
        from chatglm_sft.models.quantize import weight_bytes

        start = time.perf_counter()
        quantize = None if precision == "bf16" else precision
        model = chatglm_sft.load_model(folder, dtype=torch.bfloat16, quantize=quantize)
        self.load_seconds = time.perf_counter() - start
        self.engine = Engine(model, chatglm_sft.load_tokenizer(folder))
        table = model.get_input_embeddings().weight
        self.read = weight_bytes(model) - table.numel() * table.element_size()

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, decode tokens/s over all rows, the first row's generated ids)."""
        from chatglm_sft.infer.sampling import SamplingParams

        steps = self.engine.decode_steps(prompts, SamplingParams(max_new_tokens=new_tokens))
        start = time.perf_counter()
        tokens = [next(steps)]
        first = time.perf_counter()
        tokens += list(steps)
        end = time.perf_counter()
        return first - start, len(prompts) * (new_tokens - 1) / (end - first), [int(t[0]) for t in tokens]


def prompt_ids(folder: Path, length: int = 32) -> list[int]:
    import chatglm_sft

    ids = chatglm_sft.load_tokenizer(folder).encode(PROMPT)
    assert len(ids) >= length, f"the benchmark prompt has {len(ids)} tokens, fewer than {length}"
    return ids[:length]


def compare(folder: Path, ours_name: str, cpp_name: str, args, prompt: list[int]) -> dict:
    """Both sides of one precision, timed in alternating rounds; medians."""
    path, cpp_read = convert_for_chatglm_cpp(folder, cpp_name)
    cpp, ours = ChatglmCpp(path), Ours(folder, ours_name)
    cpp.run(prompt, 4), ours.run([prompt], 4)  # warm-up
    rounds: dict[str, list] = {k: [] for k in ("bw", "cpp", "ours", "ours8", "cpp_prefill", "ours_prefill")}
    order = [("cpp", cpp, prompt), ("ours", ours, [prompt])]
    for r in range(args.rounds):
        rounds["bw"].append(bandwidth())
        for side, runner, prompts in order if r % 2 == 0 else order[::-1]:
            prefill, rate, ids = runner.run(prompts, args.new_tokens)
            rounds[side].append(rate)
            rounds[f"{side}_prefill"].append(prefill)
            rounds[f"{side}_ids"] = ids
        rounds["ours8"].append(ours.run([prompt] * 8, args.new_tokens)[1])
    result = {k: statistics.median(v) for k, v in rounds.items() if not k.endswith("_ids")}
    result |= {
        "ratio": statistics.median(o / c for o, c in zip(rounds["ours"], rounds["cpp"], strict=True)),
        "cpp_read": cpp_read,
        "ours_read": ours.read,
        "cpp_load": cpp.load_seconds,
        "ours_load": ours.load_seconds,
        "same_first_token": rounds["cpp_ids"][0] == rounds["ours_ids"][0],
        "same_prefix": _common_prefix(rounds["cpp_ids"], rounds["ours_ids"]),
    }
    del cpp, ours, order
    gc.collect()
    path.unlink()
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Five rounds even when quick: the ratio is the median of the rounds' ratios, and of three, one slow minute could
    # decide it (one run here read 0.99 where the two sides' medians gave 1.07).
    parser.add_argument("--quick", action="store_true", help="2 layers, 5 rounds of 64 new tokens")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (chatglm.cpp takes the core count)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.new_tokens = min(args.layers, 2), min(args.new_tokens, 64)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(Path(tmp) / "model", args.layers)
        prompt = prompt_ids(folder)
        print(
            f"ChatGLM2 architecture, random weights: hidden 4096, FFN 13696, 2 kv groups, {args.layers} layers, vocab "
            f"65024; prompt {len(prompt)} tokens, {args.new_tokens} greedy new tokens, {args.rounds} alternating "
            f"rounds, medians; torch threads {torch.get_num_threads()}"
        )
        results = {}
        for ours_name, cpp_name in PAIRS:
            r = results[ours_name] = compare(folder, ours_name, cpp_name, args, prompt)
            for side, name in (("cpp", f"chatglm.cpp {cpp_name}"), ("ours", f"ours {ours_name}")):
                bound = r["bw"] / r[f"{side}_read"]
                print(
                    f"{name:17s} {r[side]:6.1f} tok/s  {r[f'{side}_read'] / 2**20:6.0f} MiB/token  bound "
                    f"{bound:6.1f} tok/s ({r[side] / bound:4.0%})  prefill {r[f'{side}_prefill'] * 1000:5.0f} ms  "
                    f"load {r[f'{side}_load']:5.2f} s"
                )
            print(
                f"{'':17s} ours/chatglm.cpp {r['ratio']:.2f}; ours batch 8 {r['ours8']:6.1f} tok/s "
                f"({r['ours8'] / r['ours']:.1f}x batch 1); bandwidth {r['bw'] / 1e9:.1f} GB/s; same first token "
                f"{'yes' if r['same_first_token'] else 'NO'}, same first {r['same_prefix']} tokens"
            )
        print(f"ratio {results['int4']['ratio']:.2f}")


if __name__ == "__main__":
    main()
