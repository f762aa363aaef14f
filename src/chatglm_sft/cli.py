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


def _load_engine(args: argparse.Namespace):
    import chatglm_sft
    from chatglm_sft.infer.engine import Engine

    # On the CPU, float32 by default: half-precision kernels there are slow or missing, and only float32 makes a
    # padded batch reproduce each row's greedy output exactly.
    dtype = args.dtype or ("float32" if str(args.device or "cpu").startswith("cpu") else None)
    model = chatglm_sft.load_model(
        args.model,
        dtype=dtype,
        device=args.device,
        family=args.family,
        adapter=args.adapter,
        quantize=args.quantize,
    )
    return Engine(model, chatglm_sft.load_tokenizer(args.model, family=args.family))


def _sampling(args: argparse.Namespace):
    from chatglm_sft.infer.sampling import SamplingParams

    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    from chatglm_sft.infer.predict import load_prompts, predict, write_jsonl

    engine = _load_engine(args)
    records, prompts = load_prompts(engine, args.data, args.format, args.prompt_field)
    rows, summary = predict(engine, records, prompts, _sampling(args), batch_size=args.batch_size)
    write_jsonl(rows, args.output)
    print(
        f"{summary.records} records -> {args.output}: {summary.generated_tokens} tokens generated in "
        f"{summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s)"
    )
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from chatglm_sft.infer.chat import ChatSession

    session = ChatSession(_load_engine(args), _sampling(args), system=args.system)
    print("chatglm-sft chat: /clear starts over, /exit (or end of input) quits", flush=True)
    while True:
        try:
            query = input("user> ")
        except EOFError:
            print()
            return 0
        if query.strip() == "/exit":
            return 0
        if query.strip() == "/clear":
            session.clear()
            print("(history cleared)")
            continue
        if not query.strip():
            continue
        print("assistant> ", end="", flush=True)
        for delta in session.send(query):
            print(delta, end="", flush=True)
        print(flush=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from chatglm_sft.eval import runner

    fields = runner.DEFAULT_FIELDS.get(args.task)
    answer_field = args.answer_field or (fields.answer if fields else None)
    if args.predictions:
        if args.task == "loss":
            raise UserError("--task loss needs --model and --data, not --predictions")
        rows = runner.read_predictions(args.predictions)
        metrics, details = runner.score_rows(args.task, rows, answer_field, args.predictions)
    else:
        if not (args.model and args.data):
            raise UserError("pass --predictions FILE, or --model DIR with --data FILE")
        engine = _load_engine(args)
        if args.task == "loss":
            from chatglm_sft.eval.loss import answer_loss

            examples = runner.loss_examples(
                engine.tokenizer, args.data, args.format, args.prompt_field, args.answer_field, args.max_length
            )
            metrics = answer_loss(engine.model, examples, engine.family.pad_id, args.batch_size)
            details = [{"tokens": sum(1 for y in labels if y != -100)} for _, labels in examples]
        else:
            from chatglm_sft.infer.predict import load_prompts, predict

            prompt_field = args.prompt_field or (fields.prompt if args.format in ("auto", "columns") else None)
            records, prompts = load_prompts(engine, args.data, args.format, prompt_field)
            rows, _ = predict(engine, records, prompts, _sampling(args), batch_size=args.batch_size)
            metrics, details = runner.score_rows(args.task, rows, answer_field, args.data)
    records_path = runner.write_results(metrics, details, args.output)
    print(runner.format_table(metrics))
    print(f"metrics -> {args.output}, per-record results -> {records_path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from chatglm_sft.train.config import TrainConfig, load_config
    from chatglm_sft.train.loop import train

    fields = TrainConfig.__dataclass_fields__
    overrides = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    train(load_config(args.config, overrides))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from chatglm_sft.data.dataset import check_records, format_report, tokenize_records

    family = tokenizer = None
    if args.model:
        import chatglm_sft
        from chatglm_sft.families import detect_family

        family = detect_family(args.model, args.family)
        tokenizer = chatglm_sft.load_tokenizer(args.model, family=family.name)
    report = check_records(args.data, args.format, args.prompt_field, args.response_field, family)
    tokenized = None
    if tokenizer is not None:
        conversations = [messages for _, messages in report.good]
        tokenized = tokenize_records(tokenizer, conversations, args.max_length)
    print(format_report(report, tokenized))
    return 1 if report.bad else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from chatglm_sft.serve.app import create_app

    engine = _load_engine(args)
    app = create_app(
        engine,
        model_name=args.model_name,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
    )
    print(f"serving {args.model} as {args.model_name!r} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_webui(args: argparse.Namespace) -> int:
    from chatglm_sft.serve.webui import build_ui

    ui = build_ui(_load_engine(args), title=args.model_name)
    ui.queue().launch(server_name=args.host, server_port=args.port, share=False)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from chatglm_sft.demo.run import run_demo

    run_demo(args.output, seed=args.seed)
    return 0


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How a model is loaded for inference (shared by predict, chat, eval, serve and webui)."""
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (ours, or LoRA in THUDM's layout)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on the CPU, as stored on a GPU)"
    )
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_runtime_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def _add_server_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--model-name", default="chatglm-sft", help="the model id clients use")
    _add_runtime_args(p)


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

    p = sub.add_parser(
        "demo",
        help="the whole pipeline in a few minutes on a CPU: tokenizer, model, training, "
        "LoRA, evaluation, predictions (no downloads)",
    )
    p.add_argument("--output", default="chatglm-sft-demo", help="folder for everything (default ./chatglm-sft-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("export", help="write a model as an HF-native folder (default) or in THUDM's layout")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--format", choices=["hf", "thudm"], default="hf", help="hf (default) or thudm")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder to merge before exporting")
    p.add_argument(
        "--dtype",
        default=None,
        help="weights dtype: float32, bfloat16 or float16 (default: as stored; float32 when merging an adapter)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="generate a response for every record of a file")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--data", required=True, help="JSON / JSONL records (alpaca, sharegpt, or --prompt-field)")
    p.add_argument("--output", required=True, help="output JSONL: each record plus `response`, in input order")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "columns"])
    p.add_argument("--prompt-field", default=None, help="field holding the prompt (columns format)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("chat", help="interactive chat in the terminal, streamed")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("eval", help="score predictions: math23k accuracy, ROUGE/BLEU, or answer-token loss")
    p.add_argument("--task", required=True, choices=["math23k", "generation", "loss"])
    p.add_argument("--predictions", default=None, help="JSONL with `response` and the answer field: score only")
    p.add_argument("--model", default=None, help="model folder: generate (or compute the loss) first")
    p.add_argument("--family", default=None, help="override family detection")
    p.add_argument("--data", default=None, help="records to evaluate on (with --model)")
    p.add_argument("--output", required=True, help="metrics JSON; per-record results go beside it")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "columns"])
    p.add_argument("--prompt-field", default=None, help="prompt field (default: original_text / content)")
    p.add_argument(
        "--answer-field",
        default=None,
        help="gold field (default: ans / summary; `reference` for generation predictions files is set with this too)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="truncate examples for --task loss")
    _add_generation_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("train", help="fine-tune (LoRA, full, freeze) on your records")
    from chatglm_sft.train.config import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser("check", help="validate a record file; exit 1 if any record is bad")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "columns"])
    p.add_argument("--prompt-field", default=None)
    p.add_argument("--response-field", default=None)
    p.add_argument("--model", default=None, help="also report token lengths with this model's tokenizer")
    p.add_argument("--family", default=None)
    p.add_argument("--max-length", type=int, default=1024, help="count examples longer than this")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API with batching and streaming")
    _add_model_args(p)
    _add_server_args(p, port=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get 429")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("webui", help="a gradio chat page")
    _add_model_args(p)
    _add_server_args(p, port=7860)
    p.set_defaults(func=_cmd_webui)

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
