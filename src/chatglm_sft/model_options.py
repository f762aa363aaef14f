"""Options shared by the commands that load a model (which folder, how to load it), and of export and info."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chatglm_sft.errors import UserError
from chatglm_sft.options import OptionError, option

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int4")


def check_family(family: str | None) -> None:
    from chatglm_sft.families import get_family

    if family:
        try:
            get_family(family)
        except UserError as e:
            raise OptionError(f"--family {family}: {e}") from None


def check_device(device: str | None) -> None:
    """`cpu`, `cuda`, `cuda:N` and the other device names torch knows, checked without importing torch."""
    if device and not re.fullmatch(r"(cpu|cuda|mps|xpu|hpu|npu|meta)(:\d+)?", device):
        raise OptionError(f"--device {device!r}: expected cpu, cuda or cuda:N")


@dataclass
class ModelRef:
    """A model folder and, when detection cannot tell, its family."""

    model: str = option("", required=True, exists="dir")
    """Model folder (THUDM layout or exported by chatglm-sft)."""
    family: str | None = None
    """Override family detection: chatglm-6b, chatglm2-6b, chatglm3-6b or glm-4."""

    def check_options(self) -> None:
        check_family(self.family)


@dataclass
class OptionalModelRef(ModelRef):
    """A model folder the command can do without."""

    model: str | None = option(None, exists="dir")
    """Model folder (THUDM layout or exported by chatglm-sft)."""


@dataclass
class LoadOptions:
    """How a model is loaded for inference (predict, chat, eval, serve, webui)."""

    adapter: str | None = option(None, exists="dir")
    """Adapter folder: LoRA or P-Tuning v2 (ours, or THUDM's layout)."""
    dtype: str | None = option(None, choices=DTYPES)
    """Weights dtype (default: float32 on the CPU, as stored on a GPU)."""
    device: str | None = None
    """cpu (default), cuda, cuda:1, ..."""
    quantize: str | None = option(None, choices=QUANTIZE)
    """Weight-only quantization."""

    def check_options(self) -> None:
        check_device(self.device)


@dataclass
class InfoOptions:
    """`chatglm-sft info`."""

    ref: ModelRef = field(default_factory=ModelRef)


@dataclass
class ExportOptions:
    """`chatglm-sft export`."""

    ref: ModelRef = field(default_factory=ModelRef)
    output: str = option("", required=True)
    """Output folder (must be empty or absent)."""
    format: str = option("hf", choices=("hf", "thudm"))
    """hf (HF-native) or thudm (THUDM's layout and parameter names)."""
    adapter: str | None = option(None, exists="dir")
    """Adapter folder: LoRA is merged into the weights; a P-Tuning prefix is written beside them (thudm only)."""
    dtype: str | None = option(None, choices=DTYPES)
    """Weights dtype (default: as stored; float32 when merging an adapter)."""
    quantize: str | None = option(None, choices=QUANTIZE)
    """Write the weights quantized (hf only; the output layer too): the folder loads without quantizing again."""
