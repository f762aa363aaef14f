"""Encode throughput: chatglm-sft's tokenizers against calling SentencePiece / tiktoken directly.

Encodes every record of alpaca_zh_demo.json (instruction + input + output, no special tokens) with each family's
tokenizer in one batch call, checks the ids are identical to the direct library's, and prints texts/s of both and
the ratio ours/direct. Usage:

    python benchmarks/tokenizer_throughput.py [--shared ../shared] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
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
        enc = tiktoken.Encoding("glm4", pat_str=GLM4_PATTERN, mergeable_ranks=load_tiktoken_bpe(
            str(folder / "tokenizer.model")), special_tokens=specials)
        return enc.encode_ordinary_batch
    if name == "chatglm-6b":
        sp = spm.SentencePieceProcessor(model_file=str(folder / "ice_text.model"))
        return lambda texts: sp.encode([preprocess(t) for t in texts])
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return sp.encode


def best_time(fn, texts, repeat: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(texts)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    records = json.loads((args.shared / "data/alpaca/alpaca_zh_demo.json").read_text())
    texts = [r["instruction"] + r.get("input", "") + r["output"] for r in records]
    chars = sum(map(len, texts))
    print(f"{len(texts)} texts, {chars} characters")
    for name in ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"]:
        folder = args.shared / "reference/models" / name
        tok = load_tokenizer(folder)
        direct = direct_encoder(name, folder, tok.family.special_tokens)
        t_ours, ours = best_time(lambda x: tok(x, add_special_tokens=False)["input_ids"], texts, args.repeat)
        t_direct, ref = best_time(direct, texts, args.repeat)
        assert ours == ref, f"{name}: ids differ from the direct library"
        print(f"{name:14s} ours {len(texts) / t_ours:9.0f} texts/s   direct {len(texts) / t_direct:9.0f} texts/s"
              f"   ratio {t_direct / t_ours:.2f}")


if __name__ == "__main__":
    main()
