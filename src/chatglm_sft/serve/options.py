"""Options of `chatglm-sft serve` and `chatglm-sft webui`."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatglm_sft.model_options import LoadOptions, ModelRef
from chatglm_sft.options import option


@dataclass
class ServerOptions:
    """Where a server listens, and the model id its clients use."""

    host: str = "127.0.0.1"
    """Address to bind (default: this machine only)."""
    port: int = option(8000, ge=1, le=65535)
    """Port to listen on."""
    model_name: str = "chatglm-sft"
    """The model id clients use."""


@dataclass
class ServedAdapters(LoadOptions):
    """How a served model is loaded: as for predict, but `--adapter` may name several LoRA adapters."""

    adapter: list[str] = option(default_factory=list, repeat=True, metavar="[NAME=]DIR")
    """DIR: an adapter applied to the served model, as in predict; NAME=DIR (repeatable): a LoRA adapter served as
    model NAME beside the base model."""


@dataclass
class ServeOptions:
    """`chatglm-sft serve`: an OpenAI-compatible HTTP API."""

    ref: ModelRef = field(default_factory=ModelRef)
    server: ServerOptions = field(default_factory=ServerOptions)
    load: ServedAdapters = field(default_factory=ServedAdapters)
    api_key: str | None = None
    """Require `Authorization: Bearer KEY`."""
    max_batch_size: int = option(8, ge=1)
    """Requests decoded together."""
    max_queue: int = option(64, ge=1)
    """Requests waiting or running; more get 429."""
    scheduler: str = option("continuous", choices=("continuous", "static"))
    """continuous: requests join and leave the batch at every step; static: a batch runs until its longest row ends
    (the previous design, kept for comparison)."""
    prefill_chunk: int = option(512, ge=1)
    """Most prompt tokens read per step (continuous), so running requests advance while a long prompt is read."""
    max_tokens_limit: int = option(4096, ge=1)
    """Most new tokens one request may ask for."""
    max_prompt_tokens: int | None = option(None, ge=1)
    """Most prompt tokens per request (default: the model's context)."""
    max_body_bytes: int = option(1 << 20, ge=1024)
    """Largest request body; larger ones get 413."""


@dataclass
class WebuiOptions:
    """`chatglm-sft webui`: a gradio chat page."""

    ref: ModelRef = field(default_factory=ModelRef)
    server: ServerOptions = field(default_factory=lambda: ServerOptions(port=7860))
    load: ServedAdapters = field(default_factory=ServedAdapters)
    auth: str | None = None
    """USER:PASS: the page asks for this login."""
