"""`chatglm-sft serve` and `chatglm-sft webui`: load the model and its adapters, then run the server."""

from __future__ import annotations

import logging
import sys

from chatglm_sft.errors import UserError
from chatglm_sft.model_options import LoadOptions
from chatglm_sft.serve.adapters import load_adapters, parse_adapter_options
from chatglm_sft.serve.options import ServeOptions, WebuiOptions


def load_served(opts: ServeOptions | WebuiOptions, load_engine):
    """The engine and {model id: PEFT adapter name} of the served adapters; `load_engine(ref, LoadOptions)` loads
    the base model as every inference command does."""
    from chatglm_sft.infer.engine import Engine

    plain, named = parse_adapter_options(opts.load.adapter)
    if named and opts.load.quantize:
        raise UserError("--adapter NAME=DIR cannot be combined with --quantize (LoRA needs the unquantized layers)")
    load = LoadOptions(adapter=plain, dtype=opts.load.dtype, device=opts.load.device, quantize=opts.load.quantize)
    engine = load_engine(opts.ref, load)
    if not named:
        return engine, {}
    model, keys = load_adapters(engine.model, named, engine.family)
    return Engine(model, engine.tokenizer, engine.family), keys


def serve(opts: ServeOptions, load_engine) -> int:
    import uvicorn

    from chatglm_sft.serve.app import create_app
    from chatglm_sft.serve.routes import Limits

    engine, adapters = load_served(opts, load_engine)
    server = opts.server
    app = create_app(
        engine,
        model_name=server.model_name,
        api_key=opts.api_key,
        max_batch_size=opts.max_batch_size,
        max_queue=opts.max_queue,
        limits=Limits(max_tokens_limit=opts.max_tokens_limit, max_prompt_tokens=opts.max_prompt_tokens),
        max_body_bytes=opts.max_body_bytes,
        scheduler=opts.scheduler,
        prefill_chunk=opts.prefill_chunk,
        adapters=adapters,
    )
    _log_requests()
    served = ", ".join(repr(m) for m in (server.model_name, *adapters))
    print(f"serving {opts.ref.model} as {served} on http://{server.host}:{server.port}", flush=True)
    uvicorn.run(app, host=server.host, port=server.port, log_level="warning")
    return 0


def webui(opts: WebuiOptions, load_engine) -> int:
    from chatglm_sft.serve.webui import build_ui

    auth = None
    if opts.auth is not None:
        user, sep, password = opts.auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth: expected USER:PASS")
        auth = (user, password)
    engine, adapters = load_served(opts, load_engine)
    server = opts.server
    ui = build_ui(engine, title=server.model_name, adapters=adapters)
    ui.queue().launch(server_name=server.host, server_port=server.port, share=False, auth=auth)
    return 0


def _log_requests() -> None:
    """One JSON line per request on stderr (see the scheduler)."""
    logger = logging.getLogger("chatglm_sft.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
