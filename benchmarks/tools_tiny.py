"""Tool calling learnt by a tiny model: `eval --task tools` name accuracy on held-out requests before and after a
LoRA fine-tune on the generated tool-use conversations, for a ChatGLM3-layout and a GLM-4-layout model
(`chatglm_sft.tools.tiny_run`, the same run as tests/tools/test_tiny_tool_training.py; figures in docs/tools.md).

    python benchmarks/tools_tiny.py OUTPUT_DIR [--family chatglm3-6b --family glm-4] [--steps 500] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from chatglm_sft.tools.tiny_run import TinyToolRun, run_tiny_tools

SHOWN = ("name_accuracy", "arguments_exact", "call_recall", "parse_errors")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--family", action="append", help="default: chatglm3-6b and glm-4")
    parser.add_argument("--steps", type=int, default=TinyToolRun.steps)
    parser.add_argument("--seed", type=int, default=TinyToolRun.seed)
    args = parser.parse_args()
    run = replace(TinyToolRun(), steps=args.steps, seed=args.seed)
    print(f"| family | {' | '.join(f'{m} before → after' for m in SHOWN)} | seconds |")
    print(f"|---|{'---|' * len(SHOWN)}---|")
    for family in args.family or ["chatglm3-6b", "glm-4"]:
        summary = run_tiny_tools(Path(args.output) / family, family, run)
        cells = [f"{summary['before'][m]:g} → {summary['after'][m]:g}" for m in SHOWN]
        print(f"| {summary['family']} | {' | '.join(cells)} | {summary['seconds']} |", flush=True)
    print(json.dumps(run.__dict__))


if __name__ == "__main__":
    main()
