"""Decoding-sized matrix products on the CPU for int8, int4 and bf16 weights (`cpu_kernels.cpp`), compiled on first
use with the machine's C++ compiler and called through ctypes.

Why not PyTorch's own kernels: on a 2-core AVX2 host (AMD EPYC, no AVX512) `_weight_int4pack_mm_for_cpu` streamed a
13696×4096 int4 weight for one row at ~6 GB/s of the ~18 GB/s the machine reads, and bf16 `F.linear` computed 8 rows
at 20 GFLOPS (float32: 100+), so int4 decoding ran at a third of its weight-read bound and bf16 batches of 8 barely
faster than one row. These loops stream each weight row once for every four rows of activations (bf16) or eight
(int8, int4: in integers, x quantized to int16 per group of columns), prefetching ahead of the hardware; several
rows are taken a chunk of columns at a time, so that their activations stay in L1 (docs/benchmarks.md has the
figures). They are used for up to `MAX_ROWS` rows of bf16 weights, prefill and larger batches keeping PyTorch's bf16
kernels; int8 and int4 layers use them for any number of rows (int8: 1.3-1.9x PyTorch's kernel at 16-64 rows;
int4: its codes are kept in this kernel's layout only, the saved one, so that the weights are not held twice).

No compiler, a failed build (each logged once), or `CHATGLM_SFT_CPU_KERNELS=0` leaves PyTorch's kernels in use.
The library is cached in `cache_root()/kernels` (`~/.cache/chatglm-sft/kernels` by default), named by a hash of the
source, the compiler, its flags and the CPU, so a home directory shared by different CPUs never loads another's build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from chatglm_sft.cache import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -fno-math-errno lets `std::lrint` (quantizing the int8 and int4 layers' activations) compile to one instruction
# instead of a library call per element; the kernels never read errno.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
MAX_ROWS = 8
"""Rows up to which bf16 layers take these loops (a decoding batch); more rows take PyTorch's kernels."""


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary name and rename, so processes building at once never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, text=True)
        os.replace(partial, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built or are turned off."""
    if os.environ.get("CHATGLM_SFT_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        logger.warning("no C++ compiler found ($CXX or c++): int8/int4/bf16 decoding uses PyTorch's CPU kernels")
        return None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_signature()]).encode()).hexdigest()
    target = cache_root() / "kernels" / f"cpu_kernels-{key[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        logger.warning("building the CPU decoding kernels failed, using PyTorch's: %s", detail.strip()[-500:])
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.int8_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.int4_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.bf16_matmul.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    return lib


@functools.cache
def bf16_arithmetic() -> bool:
    """Whether this CPU computes in bf16 natively (oneDNN's own test: AVX512-BF16 or AMX). Without it PyTorch's bf16
    matrix products convert as they go: 20 GFLOPS on a 2-core AVX2 host, where float32 reached 100."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def for_input(x: torch.Tensor, weight: torch.Tensor, max_rows: int | None = MAX_ROWS) -> ctypes.CDLL | None:
    """The kernels if they should compute `x @ weight.T`: both on the CPU, the weight contiguous, at most `max_rows`
    rows (None: any), and no gradient wanted (they have no backward)."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    if max_rows is not None and x.numel() > max_rows * x.shape[-1]:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    return library()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def int8_matmul(lib: ctypes.CDLL, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (codes int8 [out, in] * scale float32 [out, 1]).T, in float32. The kernel multiplies the codes
    with x quantized to int16 per 128 columns (steps of 2^-15 of their largest value; the weights' int8 steps are 256
    times coarser), exactly in integers."""
    rows = _rows(x)
    y = torch.empty(rows.shape[0], codes.shape[0])
    lib.int8_matmul(
        rows.data_ptr(), rows.shape[0], rows.shape[1], codes.data_ptr(), scale.data_ptr(), codes.shape[0],
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], codes.shape[0])


def bf16_matmul(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight (bf16 [out, in], contiguous).T, in float32."""
    rows = _rows(x)
    y = torch.empty(rows.shape[0], weight.shape[0])
    lib.bf16_matmul(
        rows.data_ptr(), rows.shape[0], rows.shape[1], weight.data_ptr(), weight.shape[0], y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], weight.shape[0])


def int4_matmul(
    lib: ctypes.CDLL, x: torch.Tensor, codes: torch.Tensor, scale_zero: torch.Tensor, group: int
) -> torch.Tensor:
    """x [..., in] @ w.T, in float32, for w = (q - 8) * scale + zero per group of `group` inputs (a multiple of 32):
    `codes` uint8 [out, in / 2] (the even column in the high nibble), `scale_zero` bf16 [out, in / group, 2] (by row:
    PyTorch's [in / group, out, 2] makes each row read a little from many far-apart lines, which slowed it). The
    kernel multiplies the codes with x quantized to int16 per group (steps of 2^-15 of the group's largest value)
    and the zero points with x's exact group sums."""
    rows = _rows(x)
    y = torch.empty(rows.shape[0], codes.shape[0])
    lib.int4_matmul(
        rows.data_ptr(), rows.shape[0], rows.shape[1], codes.data_ptr(), scale_zero.data_ptr(), group, codes.shape[0],
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], codes.shape[0])
