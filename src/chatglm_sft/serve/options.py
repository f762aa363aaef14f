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
class ServeOptions:
    """`chatglm-sft serve`: an OpenAI-compatible HTTP API."""

    ref: ModelRef = field(default_factory=ModelRef)
    server: ServerOptions = field(default_factory=ServerOptions)
    load: LoadOptions = field(default_factory=LoadOptions)
    api_key: str | None = None
    """Require `Authorization: Bearer KEY`."""
    max_batch_size: int = option(8, ge=1)
    """Requests decoded together."""
    max_queue: int = option(64, ge=1)
    """Requests waiting or running; more get 429."""


@dataclass
class WebuiOptions:
    """`chatglm-sft webui`: a gradio chat page."""

    ref: ModelRef = field(default_factory=ModelRef)
    server: ServerOptions = field(default_factory=lambda: ServerOptions(port=7860))
    load: LoadOptions = field(default_factory=LoadOptions)
