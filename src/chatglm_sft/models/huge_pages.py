"""A model's large weights in transparent huge pages, for decoding on the CPU (Linux).

A decode step streams every weight once. Read through 4 KiB pages that is one TLB miss every 4 KiB, and in a
virtual machine (nested page tables) each miss is a long walk. Where Linux gives huge pages only to memory that
asks for them (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`, the default of many distributions),
PyTorch's allocations get 4 KiB pages unless `THP_MEM_ALLOC_ENABLE=1` was set before the process's first
allocation. So the engine copies each large weight, once, into memory advised `MADV_HUGEPAGE` before it is touched.
Measured on the 2-core AMD VM (docs/benchmarks.md): a bf16 matrix-vector product streamed 23.4 -> 25.5 GB/s on
average, and a plain reduction over 1 GiB 25.2 -> 27.4 GB/s, which is why the decode benchmarks measure the bound
in the same kind of memory (`empty`).

The copy costs ~0.7 s per GiB of weights once, when the engine starts (1.5-1.7 s for the 2.5 GiB benchmark model
here). Weights the loader converts to another dtype (a copy anyway: THUDM's float16 ChatGLM2/3 loaded in bfloat16)
are written into huge pages as they are converted (`converted`), and the engine leaves them where they are.
Elsewhere (THP `always` or `never`, not Linux) nothing is copied: the weights already get what the system gives.
`CHATGLM_SFT_HUGE_PAGES=0` turns the copy off.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import weakref
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20
MIN_BYTES = 4 * HUGE_PAGE
"""Tensors smaller than this stay where they are."""
_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MAPPED: dict[int, weakref.ref] = {}
"""The address of each tensor `empty` made, while its mapping lives: tensors already in huge pages."""


@functools.cache
def advised_only() -> bool:
    """Whether this system gives huge pages only to memory advised so (THP mode `madvise`) and Python can advise,
    and the copy is not turned off (`CHATGLM_SFT_HUGE_PAGES=0`)."""
    if os.environ.get("CHATGLM_SFT_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[madvise]" in _MODE_FILE.read_text()
    except OSError:
        return False


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in huge pages where the system gives those on request (a plain one elsewhere).

    Its memory is a fresh anonymous mapping, advised before anything touches it, starting on a huge page: memory
    from `torch.empty` may be reused from the allocator's heap, already backed by 4 KiB pages that advice no longer
    changes. The tensor holds the mapping, which is unmapped when the tensor is freed."""
    if not advised_only():
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # The slack in front (to start on a huge page) is never touched, so never backed by memory; the tail after the
    # last whole huge page is left to 4 KiB pages, where a huge one would waste up to 2 MiB a tensor.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps `mapping` alive
    start = -whole.data_ptr() % HUGE_PAGE  # a multiple of the 4 KiB page: mmap's start is page-aligned
    try:
        if nbytes >= HUGE_PAGE:
            mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError as error:  # e.g. a kernel built without THP: 4 KiB pages, as torch.empty would give
        logger.debug("madvise(MADV_HUGEPAGE) failed: %s", error)
    tensor = whole[start : start + nbytes].view(dtype).view(shape)
    address = tensor.data_ptr()
    # Forgotten when the mapping is freed (with its last tensor), before anything else can be given that address.
    _MAPPED[address] = weakref.ref(mapping, lambda _, address=address: _MAPPED.pop(address, None))
    return tensor


def in_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether `tensor` starts where a tensor made by `empty` does (its memory is already advised)."""
    mapping = _MAPPED.get(tensor.data_ptr())
    return mapping is not None and mapping() is not None


def converted(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` for a CPU tensor; where that is a copy of a large tensor, the copy is made in huge pages
    (what the engine would otherwise copy it into once more)."""
    if tensor.dtype == dtype or not advised_only() or tensor.numel() * dtype.itemsize < MIN_BYTES:
        return tensor.to(dtype)
    return _copy(tensor, dtype)


def _movable(tensor: torch.Tensor) -> bool:
    """A large contiguous CPU tensor that owns its whole storage (no other view would be left behind)."""
    nbytes = tensor.numel() * tensor.element_size()
    return (
        tensor.device.type == "cpu"
        and nbytes >= MIN_BYTES
        and tensor.is_contiguous()
        and tensor.untyped_storage().nbytes() == nbytes
        and not in_huge_pages(tensor)
    )


def _copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    moved = empty(tensor.shape, dtype or tensor.dtype)
    moved.copy_(tensor)
    return moved


@torch.no_grad()
def use_huge_pages(model: nn.Module) -> int:
    """Copy `model`'s large CPU parameters and buffers into huge pages, in place (the same Parameter objects, so
    tied weights stay tied and optimizers keep their references), once per model. Returns how many moved."""
    if not advised_only() or getattr(model, "_chatglm_sft_huge_pages", False):
        return 0
    moved = 0
    for param in model.parameters():  # each Parameter once, tied ones included
        if _movable(param.data):
            param.data = _copy(param.data)
            moved += 1
    # A buffer registered in several modules is copied once. Its id stays its own: it is alive until the last of its
    # modules is visited, and so is every buffer not visited yet.
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and (id(buffer) in copies or _movable(buffer)):
                if id(buffer) not in copies:
                    copies[id(buffer)] = _copy(buffer)
                    moved += 1
                module._buffers[name] = copies[id(buffer)]
    model._chatglm_sft_huge_pages = True
    return moved
