"""Where chatglm-sft keeps files it can rebuild (converted tokenizers, compiled CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$CHATGLM_SFT_CACHE`, else `$XDG_CACHE_HOME/chatglm-sft`, else `~/.cache/chatglm-sft`."""
    if os.environ.get("CHATGLM_SFT_CACHE"):
        return Path(os.environ["CHATGLM_SFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatglm-sft"
