"""Record files are read in one forward pass: the same records and line numbers at any chunk size, and time per
record that does not grow with the file."""

from __future__ import annotations

import json
import time

import pytest

from chatglm_sft.data import readers
from chatglm_sft.data.readers import read_records
from chatglm_sft.errors import UserError


def records(path):
    return [(r.line, r.data, r.error) for r in read_records(path)]


@pytest.fixture(params=[1, 5, 1 << 20], ids=["chunk1", "chunk5", "chunk1M"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_CHARS", request.param)


def test_jsonl_lines_and_bad_lines(tmp_path, chunk):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": "二"}\n{"a": \n{"a": 12345}\n7\n', encoding="utf-8")
    got = records(path)
    assert [(line, data) for line, data, _ in got] == [
        (1, {"a": 1}),
        (3, {"a": "二"}),
        (4, None),
        (5, {"a": 12345}),
        (6, 7),
    ]
    assert got[2][2].startswith("invalid JSON")


def test_array_and_concatenated_objects_keep_their_lines(tmp_path, chunk):
    values = [{"instruction": "问题" * k, "n": k * 1001} for k in range(5)]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(values, ensure_ascii=False, indent=2), encoding="utf-8")
    assert [data for _, data, _ in records(array)] == values
    assert [line for line, _, _ in records(array)] == [2 + 4 * k for k in range(5)]
    concatenated = tmp_path / "c.json"
    concatenated.write_text("\n".join(json.dumps(v, indent=1) for v in values), encoding="utf-8")
    assert [(line, data) for line, data, _ in records(concatenated)] == [(1 + 4 * k, v) for k, v in enumerate(values)]


def test_broken_array_names_the_line(tmp_path, chunk):
    path = tmp_path / "a.json"
    path.write_text('[\n{"a": 1},\n{"a": x}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.json:3: invalid JSON"):
        records(path)
    path.write_text('[\n{"a": 1},\n', encoding="utf-8")
    with pytest.raises(UserError, match="not closed"):
        records(path)


def test_time_per_record_does_not_grow_with_the_file(tmp_path):
    """The old reader counted newlines from the start of the file for every record (quadratic)."""

    def seconds_per_record(n: int) -> float:
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(f'{{"instruction": "第{i}题", "output": "答"}}\n' for i in range(n)), encoding="utf-8")
        start = time.perf_counter()
        assert sum(1 for _ in read_records(path)) == n
        return (time.perf_counter() - start) / n

    seconds_per_record(2000)  # warm-up
    small, large = seconds_per_record(20_000), seconds_per_record(200_000)
    assert large <= 3 * small, (small, large)  # generous: the machine is shared; quadratic would be ~10x
