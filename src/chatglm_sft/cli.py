"""The `chatglm-sft` command line: one subcommand per job, over the library.

Every command's options are a typed record (`chatglm_sft.options`), built and checked before anything is loaded:
a bad value prints one line naming the option and exits 2. Other errors the user can fix print one line naming the
file and exit 1. `--debug` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from chatglm_sft import __version__, options
from chatglm_sft.errors import UserError
from chatglm_sft.options import OptionError
from chatglm_sft.train.config import TrainConfig, load_config
from chatglm_sft.train.config import add_arguments as add_train_arguments


def _cmd_export(opts) -> int:
    from chatglm_sft.models.export import export_model

    model = opts.ref.model
    out = export_model(
        model,
        opts.output,
        fmt=opts.format,
        adapter=opts.adapter,
        family=opts.ref.family,
        dtype=opts.dtype,
        quantize=opts.quantize,
    )
    print(f"exported {model} -> {out} ({opts.format})")
    return 0


def _cmd_info(opts) -> int:
    from chatglm_sft.families import detect_family

    fam = detect_family(opts.ref.model, opts.ref.family)
    print(
        f"family: {fam.name}\narchitecture: {fam.architecture}\ntemplate: {fam.template}\n"
        f"stop ids: {fam.stop_ids}\nLoRA targets: {', '.join(fam.lora_targets)}"
    )
    return 0


def _load_engine(ref, load):
    """An inference engine for `ref` (ModelRef) loaded as `load` (LoadOptions) says."""
    import chatglm_sft
    from chatglm_sft.infer.engine import Engine

    # On the CPU, float32 by default: half-precision kernels there are slow or missing, and only float32 makes a
    # padded batch reproduce each row's greedy output exactly.
    dtype = load.dtype or ("float32" if str(load.device or "cpu").startswith("cpu") else None)
    model = chatglm_sft.load_model(
        ref.model,
        dtype=dtype,
        device=load.device,
        family=ref.family,
        adapter=load.adapter,
        quantize=load.quantize,
    )
    return Engine(model, chatglm_sft.load_tokenizer(ref.model, family=ref.family))


def _cmd_predict(opts) -> int:
    from chatglm_sft.infer.predict import load_prompts, predict, write_jsonl

    engine = _load_engine(opts.ref, opts.load)
    records, prompts = load_prompts(engine, opts.data, opts.format, opts.prompt_field)
    rows, summary = predict(engine, records, prompts, opts.sampling, batch_size=opts.batch_size)
    write_jsonl(rows, opts.output)
    print(
        f"{summary.records} records -> {opts.output}: {summary.generated_tokens} tokens generated in "
        f"{summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tokens/s)"
    )
    return 0


def _cmd_chat(opts) -> int:
    from chatglm_sft.infer.chat import ChatSession, load_tools

    engine = _load_engine(opts.ref, opts.load)
    tools = load_tools(opts.tools, engine.family) if opts.tools else None
    session = ChatSession(engine, opts.sampling, system=opts.system, tools=tools)
    print("chatglm-sft chat: /clear starts over, /exit (or end of input) quits", flush=True)
    while True:
        try:
            query = input("user> ")
            if tools is not None and query.strip() and not query.strip().startswith("/"):
                _tool_turn(session, query)
                continue
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


def _tool_turn(session, query: str) -> None:
    """One user turn with tools: show each call the model makes, read its result (a line of text or JSON) from the
    terminal, and go on until the model answers in text."""
    message = session.reply_to([{"role": "user", "content": query}])
    while message.get("tool_calls"):
        if message["content"]:
            print(f"assistant> {message['content']}", flush=True)
        results = []
        for call in message["tool_calls"]:
            print(f"call> {call['function']['name']} {call['function']['arguments']}", flush=True)
            results.append({"role": "tool", "content": input("tool> ")})
        message = session.reply_to(results)
    print(f"assistant> {message['content']}", flush=True)


def _cmd_eval(opts) -> int:
    from chatglm_sft.eval import runner

    fields = runner.DEFAULT_FIELDS.get(opts.task)
    answer_field = opts.answer_field  # None: the task's default, read from the records (runner.score_rows)
    if opts.predictions:
        from chatglm_sft.families import get_family

        rows = runner.read_predictions(opts.predictions)
        family = get_family(opts.ref.family) if opts.ref.family else None
        metrics, details = runner.score_rows(opts.task, rows, answer_field, opts.predictions, family)
    else:
        engine = _load_engine(opts.ref, opts.load)
        if opts.task == "loss":
            from chatglm_sft.eval.loss import answer_loss

            examples = runner.loss_examples(
                engine.tokenizer, opts.data, opts.format, opts.prompt_field, opts.answer_field, opts.max_length
            )
            metrics = answer_loss(engine.model, examples, engine.family.pad_id, opts.batch_size)
            details = [{"tokens": sum(1 for y in labels if y != -100)} for _, labels in examples]
        else:
            from chatglm_sft.infer.predict import load_prompts

            default_prompt = fields.prompt if fields and opts.format in ("auto", "columns") else None
            prompt_field = opts.prompt_field or default_prompt
            records, prompts = load_prompts(engine, opts.data, opts.format, prompt_field)
            rows = runner.generate_rows(opts.task, engine, records, prompts, opts.sampling, opts.batch_size)
            metrics, details = runner.score_rows(opts.task, rows, answer_field, opts.data, engine.family)
    records_path = runner.write_results(metrics, details, opts.output)
    print(runner.format_table(metrics))
    print(f"metrics -> {opts.output}, per-record results -> {records_path}")
    return 0


def _cmd_train(config) -> int:
    from chatglm_sft.train.loop import train

    train(config)
    return 0


def _cmd_data_check(opts) -> int:
    from chatglm_sft.data.dataset import check_records, format_report
    from chatglm_sft.data.pairs import check_pairs, is_pair_file

    family = counter = None

    def on_good(_line, _messages):  # only counted: the records are never all held
        pass

    if opts.ref.model:
        from chatglm_sft.families import detect_family

        family = detect_family(opts.ref.model, opts.ref.family)
    if is_pair_file(opts.data):  # preference pairs: prompt, chosen, rejected
        report = check_pairs(opts.data, family)
        print(format_report(report))
        if family is not None:
            _report_cut_pairs(opts, report)
        return 1 if report.bad else 0
    if family is not None:
        from chatglm_sft.data.lengths import TokenCounter, workers_for

        on_good = counter = TokenCounter(opts.ref.model, family.name, opts.max_length, workers_for(opts.data))
    report = check_records(opts.data, opts.format, opts.prompt_field, opts.response_field, family, on_good)
    print(format_report(report, counter.result() if counter else None))
    return 1 if report.bad else 0


def _report_cut_pairs(opts, report) -> None:
    """The good pairs that --max-length cuts to the same tokens in chosen and rejected, which training leaves out
    (they are not bad records: a longer --max-length keeps them)."""
    import chatglm_sft
    from chatglm_sft.data.pairs import encode_pair

    tokenizer = chatglm_sft.load_tokenizer(opts.ref.model, family=opts.ref.family)
    cut = [line for line, pair in report.good if encode_pair(tokenizer, pair, opts.max_length).alike]
    if cut:
        print(f"cut to the same tokens by --max-length {opts.max_length} (training leaves them out): {len(cut)}")
        print("\n".join(f"  {opts.data}:{line}" for line in cut[:20]) + ("\n  ..." if len(cut) > 20 else ""))


def _cmd_data_tokenize(opts) -> int:
    import chatglm_sft
    from chatglm_sft.data.dataset import check_records, format_report
    from chatglm_sft.data.tokenize import write_tokenized

    tokenizer = chatglm_sft.load_tokenizer(opts.ref.model, family=opts.ref.family)
    report = check_records(opts.data, opts.format, opts.prompt_field, opts.response_field, tokenizer.family)
    written = write_tokenized(tokenizer, report, opts.output, last_turn_only=opts.train_on == "last")
    print(format_report(report))
    print(f"{written} records -> {opts.output}")
    return 1 if report.bad else 0


def _cmd_serve(opts) -> int:
    from chatglm_sft.serve.commands import serve

    return serve(opts, _load_engine)


def _cmd_webui(opts) -> int:
    from chatglm_sft.serve.commands import webui

    return webui(opts, _load_engine)


def _cmd_demo(opts) -> int:
    from chatglm_sft.demo.run import run_demo

    run_demo(opts.output, seed=opts.seed)
    return 0


# (name, help, function, options record as "module:Class") per command; `data` commands are "data NAME".
COMMANDS = (
    (
        "demo",
        "the whole pipeline in a few minutes on a CPU: tokenizer, model, training, LoRA, evaluation, predictions "
        "(no downloads)",
        _cmd_demo,
        "chatglm_sft.demo.options:DemoOptions",
    ),
    (
        "export",
        "write a model as an HF-native folder (default) or in THUDM's layout",
        _cmd_export,
        "chatglm_sft.model_options:ExportOptions",
    ),
    (
        "predict",
        "generate a response for every record of a file",
        _cmd_predict,
        "chatglm_sft.infer.options:PredictOptions",
    ),
    ("chat", "interactive chat in the terminal, streamed", _cmd_chat, "chatglm_sft.infer.options:ChatOptions"),
    (
        "eval",
        "score predictions: math23k accuracy, ROUGE/BLEU, answer-token loss, or tool calls",
        _cmd_eval,
        "chatglm_sft.eval.options:EvalOptions",
    ),
    (
        "train",
        "fine-tune (LoRA, full, freeze, P-Tuning v2, QLoRA) on your records",
        _cmd_train,
        "chatglm_sft.train.config:TrainConfig",
    ),
    (
        "data check",
        "validate a record file; exit 1 if any record is bad",
        _cmd_data_check,
        "chatglm_sft.data.options:DataCheckOptions",
    ),
    (
        "data tokenize",
        "write each record's input_ids and labels (what training learns) as JSONL",
        _cmd_data_tokenize,
        "chatglm_sft.data.options:DataTokenizeOptions",
    ),
    (
        "serve",
        "OpenAI-compatible HTTP API with batching and streaming",
        _cmd_serve,
        "chatglm_sft.serve.options:ServeOptions",
    ),
    ("webui", "a gradio chat page", _cmd_webui, "chatglm_sft.serve.options:WebuiOptions"),
    ("info", "show the detected family of a model folder", _cmd_info, "chatglm_sft.model_options:InfoOptions"),
)


def _record(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only` (the command being run), the other commands get no options, so their records (and
    what those import) are not loaded."""
    parser = options.ArgumentParser(
        prog="chatglm-sft",
        description="Fine-tune, run, evaluate and serve ChatGLM models (ChatGLM-6B, ChatGLM2/3-6B, GLM-4-9B).",
    )
    parser.add_argument("--version", action="version", version=f"chatglm-sft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, help_text, func, record in COMMANDS:
        group, _, leaf = name.rpartition(" ")
        where = sub
        if group:
            if group not in groups:
                g = sub.add_parser(group, help=f"{group} tools")
                groups[group] = g.add_subparsers(dest=f"{group}_command", metavar=f"{group.upper()}_COMMAND")
                groups[group].required = True
            where = groups[group]
        p = where.add_parser(leaf, help=help_text, description=help_text)
        # --debug after the command too; SUPPRESS keeps a --debug given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        if only is not None and name.split()[0] != only:
            continue
        cls = _record(record)
        if cls is TrainConfig:
            add_train_arguments(p)
        else:
            options.add_options(p, cls)
        p.set_defaults(func=func, record=cls)
    return parser


def read_options(args: argparse.Namespace):
    """The command's options record from the command line (and a YAML recipe for train), checked: ranges, and
    that the files and folders it names exist. Nothing has been loaded yet."""
    if args.record is TrainConfig:
        return load_config(args.config, options.given(TrainConfig, args), check_paths_exist=True)
    return options.build(args.record, options.given(args.record, args), check_paths_exist=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in {name.split()[0] for name, *_ in COMMANDS} else None)
    args = parser.parse_args(argv)
    func: Callable = args.func
    try:
        return func(read_options(args))
    except OptionError as e:
        if args.debug:
            raise
        print(f"chatglm-sft {args.command}: error: {e}", file=sys.stderr)
        return 2
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
