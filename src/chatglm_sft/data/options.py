"""Options of the `chatglm-sft data` commands."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatglm_sft.model_options import OptionalModelRef
from chatglm_sft.options import option

FORMATS = ("auto", "alpaca", "sharegpt", "columns")


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
