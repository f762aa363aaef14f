"""Options of the `chatglm-sft data` commands."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatglm_sft.data.formats import FORMATS
from chatglm_sft.model_options import ModelRef, OptionalModelRef
from chatglm_sft.options import option


@dataclass
class DataCheckOptions:
    """`chatglm-sft data check`."""

    data: str = option("", required=True, exists="file")
    """Record file (JSON array, JSONL or concatenated JSON)."""
    format: str = option("auto", choices=FORMATS)
    """Record format."""
    prompt_field: str | None = None
    """Prompt field (columns format)."""
    response_field: str | None = None
    """Response field (columns format)."""
    ref: OptionalModelRef = field(default_factory=OptionalModelRef)
    max_length: int = option(1024, ge=1)
    """Count examples longer than this many tokens (with --model)."""


@dataclass
class DataTokenizeOptions:
    """`chatglm-sft data tokenize`."""

    ref: ModelRef = field(default_factory=ModelRef)
    data: str = option("", required=True, exists="file")
    """Record file (JSON array, JSONL or concatenated JSON)."""
    output: str = option("", required=True)
    """Output JSONL: `line`, `input_ids` and `labels` (-100 where nothing is learned) per good record."""
    format: str = option("auto", choices=FORMATS)
    """Record format."""
    prompt_field: str | None = None
    """Prompt field (columns format)."""
    response_field: str | None = None
    """Response field (columns format)."""
    train_on: str = option("all", choices=("all", "last"))
    """Which assistant replies are learned: all (default) or the last one."""
