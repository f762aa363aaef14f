"""Options of `chatglm-sft eval`."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatglm_sft.data.formats import FORMATS
from chatglm_sft.infer.sampling import SamplingParams
from chatglm_sft.model_options import LoadOptions, OptionalModelRef
from chatglm_sft.options import OptionError, option

TASKS = ("math23k", "generation", "loss", "tools")


@dataclass
class EvalOptions:
    """`chatglm-sft eval`: score a predictions file, or generate (or compute the loss) with a model first."""

    task: str = option("", required=True, choices=TASKS)
    """What to score."""
    predictions: str | None = option(None, exists="file")
    """JSONL with `response` and the answer field: score only."""
    ref: OptionalModelRef = field(default_factory=OptionalModelRef)
    load: LoadOptions = field(default_factory=LoadOptions)
    data: str | None = option(None, exists="file")
    """Records to evaluate on (with --model)."""
    output: str = option("", required=True)
    """Metrics JSON; per-record results go beside it."""
    format: str = option("auto", choices=FORMATS)
    """Record format (with --data)."""
    prompt_field: str | None = None
    """Prompt field (default: original_text for math23k, content for generation)."""
    answer_field: str | None = None
    """Gold field (default: ans for math23k; reference, else summary, for generation)."""
    batch_size: int = option(8, ge=1)
    """Examples generated (or scored) together."""
    max_length: int | None = option(None, ge=1)
    """Truncate examples for --task loss."""
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def check_options(self) -> None:
        if self.predictions and self.task == "loss":
            raise OptionError("--predictions: --task loss needs --model and --data, not predictions")
        if self.predictions and (self.ref.model or self.data):
            raise OptionError("--predictions: pass either --predictions or --model with --data, not both")
        if not self.predictions and not (self.ref.model and self.data):
            raise OptionError("--predictions: pass --predictions FILE, or --model DIR with --data FILE")
