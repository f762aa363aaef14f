"""`chatglm-sft data check` at 10k, 100k and 1M records: is reading, checking and tokenizing linear?

Generates alpaca JSONL files of mixed-length Chinese records (deterministic; short and long instructions, inputs
and outputs), times `chatglm-sft data check --data F --model TOKENIZER` on each in a fresh process (tokenization
included) and reads the process's peak RSS. The tokenizer is ChatGLM2-6B's from ../shared when it is there, else a
ChatGLM2-shaped one the project makes (`chatglm_sft.tokenization.synthetic`). The last line is
`scaling X`, X = (wall seconds per record at the largest size) / (the same at the size before it); linear is 1.0
(a little under, since start-up is spread over more records). The line before gives the same ratio of CPU seconds,
which other work on the machine disturbs less. Usage:

    python benchmarks/data_scale.py [--quick] [--sizes 10000,100000,1000000] [--work DIR] [--shared ../shared]

`--quick` runs 5k and 50k records.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定"
    "行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些"
    "然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公"
)
PUNCT = "，。、；：？！"


def sentence(rng: random.Random, length: int) -> str:
    out = []
    while len(out) < length:
        out.extend(rng.choices(CHARS, k=rng.randint(4, 18)))
        out.append(rng.choice(PUNCT))
    return "".join(out[:length])


def mixed_length(rng: random.Random, median: int, longest: int) -> int:
    """Log-normal around `median`, capped: most records short, some long."""
    return max(1, min(longest, int(rng.lognormvariate(0, 0.9) * median)))


def write_records(path: Path, count: int, seed: int = 0) -> Path:
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(count):
            record = {
                "instruction": sentence(rng, mixed_length(rng, 20, 200)),
                "input": sentence(rng, mixed_length(rng, 40, 600)) if rng.random() < 0.4 else "",
                "output": sentence(rng, mixed_length(rng, 80, 1500)),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def tokenizer_folder(shared: Path, work: Path) -> tuple[Path, str]:
    real = shared / "reference" / "models" / "chatglm2-6b"
    if (real / "tokenizer.model").exists():
        return real, "ChatGLM2-6B (../shared)"
    from chatglm_sft.tokenization.synthetic import write_tokenizer

    folder = work / "chatglm2-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_tokenizer(folder, "chatglm2-6b")
    return folder, "ChatGLM2-shaped, made by chatglm_sft.tokenization.synthetic"


def timed_check(data: Path, model: Path) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (its worker processes included), peak RSS of its largest process (MiB) and the
    output of `chatglm-sft data check` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatglm_sft", "data", "check", "--data", str(data), "--model", str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"data check failed on {data}:\n{output[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5k and 50k records")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--work", default=None, help="folder for the generated files (kept; default: a temp dir)")
    parser.add_argument("--shared", default=str(HERE.parents[1] / "shared"))
    args = parser.parse_args()
    sizes = [5000, 50000] if args.quick else [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, described = tokenizer_folder(Path(args.shared), work)
        print(f"tokenizer: {described}; {os.cpu_count()} CPUs")
        print(f"{'records':>9}  {'MiB':>7}  {'seconds':>8}  {'us/record':>9}  {'CPU s':>7}  {'peak RSS MiB':>12}")
        per_record, cpu_per_record = [], []
        for n in sizes:
            data = write_records(work / f"alpaca-{n}.jsonl", n)
            seconds, cpu, rss, output = timed_check(data, model)
            per_record.append(seconds / n)
            cpu_per_record.append(cpu / n)
            mib = data.stat().st_size / 2**20
            print(
                f"{n:>9}  {mib:>7.1f}  {seconds:>8.1f}  {seconds / n * 1e6:>9.1f}  {cpu:>7.1f}  {rss:>12.0f}",
                flush=True,
            )
        tokens = [line for line in output.splitlines() if line.startswith("tokens per example")]
        if tokens:
            print(f"largest file: {tokens[0]}")
    print(f"CPU-time scaling {cpu_per_record[-1] / cpu_per_record[-2]:.2f} (less sensitive to other load)")
    print(f"scaling {per_record[-1] / per_record[-2]:.2f}")


if __name__ == "__main__":
    main()
