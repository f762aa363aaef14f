"""Options of `chatglm-sft demo`."""

from __future__ import annotations

from dataclasses import dataclass

from chatglm_sft.options import option


@dataclass
class DemoOptions:
    """`chatglm-sft demo`."""

    output: str = "chatglm-sft-demo"
    """Folder for everything."""
    seed: int = option(0, ge=0, le=2**32 - 1)
    """Seed of the generated problems, the model and training."""
