"""The training loss over the output layer: `F.cross_entropy` against
`chatglm_sft.cross_entropy.cross_entropy_in_place` (the loss `train` uses), side by side in one run.

What one training step does after the last hidden states: logits for the answer tokens (hidden @ W^T), the summed
cross-entropy, and the backward to the hidden states (and to W, as full fine-tuning also trains the output layer).
Rounds alternate the two losses; the figures are medians. Peak memory is the growth of the process's resident set
during one call of each, measured in child processes so that neither inherits the other's freed pages.

    python benchmarks/cross_entropy.py                       # GLM-4's vocabulary, 512 answer tokens, hidden 64
    python benchmarks/cross_entropy.py --vocab 65024 --tokens 2048 --hidden 256 --train-weight
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time


def one_step(kind: str, hidden, weight, target) -> float:
    import torch.nn.functional as F

    from chatglm_sft.cross_entropy import cross_entropy_in_place

    start = time.perf_counter()
    h = hidden.detach().requires_grad_()
    logits = h @ weight.T
    if kind == "F.cross_entropy":
        loss = F.cross_entropy(logits, target, reduction="sum")
    else:
        loss = cross_entropy_in_place(logits, target).sum()
    loss.backward()
    return time.perf_counter() - start


def inputs(args):
    import torch

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden)
    weight = (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_(args.train_weight)
    return hidden, weight, torch.randint(0, args.vocab, (args.tokens,))


def peak_growth(kind: str, args, out) -> None:
    import torch

    torch.set_num_threads(args.threads)
    hidden, weight, target = inputs(args)
    before = _rss_high_water()
    one_step(kind, hidden, weight, target)
    out.put(_rss_high_water() - before)


def _rss_high_water() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151552)
    parser.add_argument("--tokens", type=int, default=512, help="answer tokens in the step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--train-weight", action="store_true", help="also the output layer's gradient (full FT)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    kinds = ("F.cross_entropy", "in place")
    hidden, weight, target = inputs(args)
    times = {k: [] for k in kinds}
    for r in range(args.rounds + 1):
        for kind in kinds if r % 2 else reversed(kinds):
            seconds = one_step(kind, hidden, weight, target)
            if r:  # the first round warms up allocator and caches
                times[kind].append(seconds)
    context = multiprocessing.get_context("spawn")
    print(f"{args.tokens} tokens x vocabulary {args.vocab}, hidden {args.hidden}, {args.threads} thread(s)")
    for kind in kinds:
        queue = context.Queue()
        child = context.Process(target=peak_growth, args=(kind, args, queue))
        child.start()
        growth = queue.get()
        child.join()
        print(f"{kind:16s} {statistics.median(times[kind]) * 1000:8.1f} ms  peak +{growth / 2**20:7.0f} MiB")
    ratio = statistics.median(times["F.cross_entropy"]) / statistics.median(times["in place"])
    print(f"ratio {ratio:.2f} (F.cross_entropy time / in-place time)")


if __name__ == "__main__":
    main()
