"""The engine's copy of large weights into transparent huge pages (`chatglm_sft.models.huge_pages`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from chatglm_sft.models import huge_pages


def _huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not huge_pages.advised_only(), reason="the system's THP mode is not `madvise` (nothing to do)")
def test_empty_gets_huge_pages_once_touched():
    tensor = huge_pages.empty((16 * 2**20,), torch.uint8)
    tensor.fill_(1)
    plain = torch.empty(16 * 2**20, dtype=torch.uint8)
    plain.fill_(1)
    # The kernel may be short of free huge pages; at least one of the 7 whole ones inside is expected.
    assert _huge_kib_at(tensor.data_ptr() + 8 * 2**20) >= 2048
    assert _huge_kib_at(plain.data_ptr() + 8 * 2**20) == 0


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4096, 1024)  # 16 MiB: moved
        self.head = nn.Linear(1024, 4096, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.small = nn.Linear(8, 8)  # stays
        codes = torch.randint(0, 255, (9 * 2**20,), dtype=torch.uint8)
        self.register_buffer("codes", codes)
        self.other = nn.Module()
        self.other.register_buffer("codes", codes)  # the same buffer in two modules
        self.register_buffer("view", torch.zeros(2 * 2**20 * 6)[: 2**20 * 3])  # a view of a larger storage: stays


def test_use_huge_pages_keeps_values_identity_and_ties(monkeypatch):
    monkeypatch.setattr(huge_pages, "advised_only", lambda: True)
    model = _Tied()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    embed, small = model.embed.weight, model.small.weight
    pointers = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}

    assert huge_pages.use_huge_pages(model) == 2  # the tied weight once, the shared buffer once

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert model.embed.weight is embed and model.small.weight is small  # the same Parameter objects
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr() != pointers["embed.weight"]
    assert model.codes is model.other.codes and model.codes.data_ptr() != pointers["codes"]
    assert model.small.weight.data_ptr() == pointers["small.weight"]
    assert model.view.data_ptr() == pointers["view"]
    assert huge_pages.use_huge_pages(model) == 0  # once per model


def test_nothing_moves_where_the_system_does_not_ask(monkeypatch):
    monkeypatch.setattr(huge_pages, "advised_only", lambda: False)
    model = _Tied()
    pointer = model.embed.weight.data_ptr()
    assert huge_pages.use_huge_pages(model) == 0
    assert model.embed.weight.data_ptr() == pointer


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("CHATGLM_SFT_HUGE_PAGES", "0")
    huge_pages.advised_only.cache_clear()
    try:
        assert not huge_pages.advised_only()
    finally:
        monkeypatch.undo()
        huge_pages.advised_only.cache_clear()


def test_a_conversion_lands_in_huge_pages_once(monkeypatch):
    monkeypatch.setattr(huge_pages, "advised_only", lambda: True)
    half = torch.randn(2048, 2048, dtype=torch.float16)  # 8 MiB; 16 MiB in float32
    full = huge_pages.converted(half, torch.float32)
    assert full.dtype == torch.float32 and torch.equal(full, half.float())
    assert huge_pages.in_huge_pages(full) and not huge_pages.in_huge_pages(half)
    assert huge_pages.converted(full, torch.float32) is full  # no conversion, no copy
    small = huge_pages.converted(half[:4], torch.float32)
    assert not huge_pages.in_huge_pages(small)  # below MIN_BYTES: a plain conversion

    model = nn.Linear(2048, 2048, bias=False)
    model.weight.data = full
    assert huge_pages.use_huge_pages(model) == 0  # already there: not copied again
    assert model.weight.data_ptr() == full.data_ptr()


def test_a_freed_mapping_is_forgotten(monkeypatch):
    monkeypatch.setattr(huge_pages, "advised_only", lambda: True)
    tensor = huge_pages.empty((9 * 2**20,), torch.uint8)
    address = tensor.data_ptr()
    assert address in huge_pages._MAPPED
    del tensor
    assert address not in huge_pages._MAPPED  # whatever is given that address later is not taken for ours


def test_the_loader_converts_into_huge_pages(monkeypatch, tiny_checkpoint):
    import chatglm_sft

    monkeypatch.setattr(huge_pages, "advised_only", lambda: True)
    folder = tiny_checkpoint("chatglm2-6b", dtype=torch.float16)  # stored in float16, loaded in float32
    model = chatglm_sft.load_model(folder, dtype=torch.float32)
    embeddings, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embeddings.dtype == torch.float32 and embeddings.numel() * 4 >= huge_pages.MIN_BYTES
    assert huge_pages.in_huge_pages(embeddings) and huge_pages.in_huge_pages(output)
    pointers = (embeddings.data_ptr(), output.data_ptr())
    huge_pages.use_huge_pages(model)
    assert (embeddings.data_ptr(), output.data_ptr()) == pointers
