"""Encode throughput: chatglm-sft's tokenizers against calling SentencePiece / tiktoken directly.

Encodes every record of alpaca_zh_demo.json (instruction + input + output, no special tokens) with each family's
tokenizer in one batch call and checks the ids equal the direct library's. `ratio` is the median, over rounds that
alternate the contenders, of direct time / our time for ids only (`return_attention_mask=False`, like the direct
call); "with mask" is the default call, which also builds attention masks. Usage:

    python benchmarks/tokenizer_throughput.py [--shared ../shared] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from chatglm_sft import load_tokenizer
from chatglm_sft.tokenization.fast import GLM4_PATTERN
from chatglm_sft.tokenization.v1 import preprocess


def direct_encoder(name: str, folder: Path, specials: dict[str, int]):
    if name == "glm-4-9b-chat":
        enc = tiktoken.Encoding(
            "glm4",
            pat_str=GLM4_PATTERN,
            mergeable_ranks=load_tiktoken_bpe(str(folder / "tokenizer.model")),
            special_tokens=specials,
        )
        return enc.encode_ordinary_batch
    if name == "chatglm-6b":
        sp = spm.SentencePieceProcessor(model_file=str(folder / "ice_text.model"))
        return lambda texts: sp.encode([preprocess(t) for t in texts])
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return sp.encode


def interleaved_times(fns, texts, rounds: int) -> tuple[list[list[float]], list]:
    """Time each function once per round, rotating the order, so machine noise hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    outputs = [None] * len(fns)
    order = list(range(len(fns)))
    for r in range(rounds):
        for i in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            start = time.perf_counter()
            outputs[i] = fns[i](texts)
            times[i].append(time.perf_counter() - start)
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    records = json.loads((args.shared / "data/alpaca/alpaca_zh_demo.json").read_text())
    texts = [r["instruction"] + r.get("input", "") + r["output"] for r in records]
    chars = sum(map(len, texts))
    print(f"{len(texts)} texts, {chars} characters")
    for name in ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]:
        folder = args.shared / "reference/models" / name
        tok = load_tokenizer(folder)
        direct = direct_encoder(name, folder, tok.family.special_tokens)

        def ours_ids(x, tok=tok):
            return tok(x, add_special_tokens=False, return_attention_mask=False)["input_ids"]

        def ours_call(x, tok=tok):
            return tok(x, add_special_tokens=False)["input_ids"]

        (t_direct, t_ids, t_call), (ref, ours, _) = interleaved_times(
            [direct, ours_ids, ours_call], texts, args.rounds
        )
        assert ours == ref, f"{name}: ids differ from the direct library"
        ratio = statistics.median(d / o for d, o in zip(t_direct, t_ids, strict=True))
        ratio_mask = statistics.median(d / o for d, o in zip(t_direct, t_call, strict=True))
        n = len(texts)
        print(
            f"{name:14s} direct {n / min(t_direct):8.0f} texts/s   ours ids {n / min(t_ids):8.0f}   "
            f"ours ids+mask {n / min(t_call):8.0f}   ratio {ratio:.2f}   (with mask {ratio_mask:.2f})"
        )


if __name__ == "__main__":
    main()
