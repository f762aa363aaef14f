"""The `chatglm-sft` command line: one subcommand per job, over the library.

Errors the user can fix print one line naming the file and exit 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from chatglm_sft import __version__
from chatglm_sft.errors import UserError


def _cmd_export(args: argparse.Namespace) -> int:
    from chatglm_sft.models.export import export_model

    out = export_model(
        args.model, args.output, fmt=args.format, adapter=args.adapter, family=args.family, dtype=args.dtype
    )
    print(f"exported {args.model} -> {out} ({args.format})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from chatglm_sft.families import detect_family

    fam = detect_family(args.model, args.family)
    print(
        f"family: {fam.name}\narchitecture: {fam.architecture}\ntemplate: {fam.template}\n"
        f"stop ids: {fam.stop_ids}\nLoRA targets: {', '.join(fam.lora_targets)}"
    )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (THUDM layout or exported by chatglm-sft)")
    p.add_argument(
        "--family", default=None, help="override family detection: chatglm-6b, chatglm2-6b, chatglm3-6b or glm-4"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatglm-sft",
        description="Fine-tune, run, evaluate and serve ChatGLM models (ChatGLM-6B, ChatGLM2/3-6B, GLM-4-9B).",
    )
    parser.add_argument("--version", action="version", version=f"chatglm-sft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("export", help="write a model as an HF-native folder (default) or in THUDM's layout")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--format", choices=["hf", "thudm"], default="hf", help="hf (default) or thudm")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder to merge before exporting")
    p.add_argument("--dtype", default=None, help="weights dtype: float32, bfloat16 or float16 (default: as stored)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="show the detected family of a model folder")
    _add_model_args(p)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"chatglm-sft: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chatglm-sft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
