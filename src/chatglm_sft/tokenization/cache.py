"""A disk cache for built fast-tokenizer backends.

Converting GLM-4's 150k tiktoken ranks into a `tokenizers` BPE takes seconds of pure Python on every load; reading
the resulting tokenizer.json takes a fraction of that. The key covers everything the result depends on: the bytes of
the tokenizer file, the family's special tokens and prefix, the versions of `tokenizers` and `transformers` (the
converter), and the source of the module that builds it, so a change to any of them is a miss, never a stale hit.
The cache is a speed-up only: a damaged entry is rebuilt, and an unwritable cache folder just means no caching.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import tokenizers
import transformers
from tokenizers import Tokenizer

from chatglm_sft.cache import cache_root
from chatglm_sft.families import Family
from chatglm_sft.tokenization import fast


def entry_path(family: Family, model_file: Path) -> Path:
    digest = hashlib.sha256()
    digest.update(model_file.read_bytes())
    digest.update(Path(fast.__file__).read_bytes())
    described = {
        "family": family.name,
        "kind": family.tokenizer_kind,
        "special_tokens": sorted(family.special_tokens.items()),
        "prefix": list(family.prefix_tokens),
        "matches_specials_in_text": family.matches_specials_in_text,
        "versions": [tokenizers.__version__, transformers.__version__],
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    return cache_root() / "tokenizers" / f"{family.name}-{digest.hexdigest()[:24]}.json"


def load_backend(family: Family, model_file: str | Path) -> Tokenizer:
    """`fast.build_backend(family, model_file)`, from the cache when it holds it."""
    model_file = Path(model_file)
    path = entry_path(family, model_file)
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # noqa: BLE001 - any damage to an entry means: build it again
            pass
    backend = fast.build_backend(family, str(model_file))
    _store(path, backend.to_str())
    return backend


def _store(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a concurrent reader sees the old state or the whole entry."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
            tmp = f.name
            f.write(text)
        os.replace(tmp, path)
    except OSError:  # no cache this time; the tokenizer itself is fine
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
