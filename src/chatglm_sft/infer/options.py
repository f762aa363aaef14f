"""Options of `chatglm-sft predict` and `chatglm-sft chat`."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatglm_sft.data.formats import FORMATS
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.model_options import LoadOptions, ModelRef
from chatglm_sft.options import option


@dataclass
class PredictOptions:
    """`chatglm-sft predict`."""

    ref: ModelRef = field(default_factory=ModelRef)
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    data: str = option("", required=True, exists="file")
    """JSON / JSONL records (alpaca, sharegpt, or columns with --prompt-field)."""
    output: str = option("", required=True)
    """Output JSONL: each record plus `response`, in input order."""
    format: str = option("auto", choices=FORMATS)
    """Record format."""
    prompt_field: str | None = None
    """Field holding the prompt (columns format)."""
    batch_size: int = option(8, ge=1)
    """Prompts generated together."""


@dataclass
class ChatOptions:
    """`chatglm-sft chat`."""

    ref: ModelRef = field(default_factory=ModelRef)
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    """System message."""
    tools: str | None = option(None, exists="file")
    """JSON file with a list of tools (OpenAI function tools): replies may call them, and you type each result."""
