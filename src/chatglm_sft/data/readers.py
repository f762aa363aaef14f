"""Reading record files in one pass: a JSON array, JSON Lines, or JSON values one after another.

The file is read in chunks and each record is decoded once where it stands, so reading is linear in the file's
size and holds only one chunk (or one record, if larger) besides what the caller keeps. Line numbers are counted
as the reader moves forward, so every record knows the line where it starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatglm_sft.errors import UserError

CHUNK_CHARS = 1 << 20


@dataclass
class Record:
    line: int
    """1-based line where the record starts."""
    data: object
    """The parsed JSON value (a dict when well-formed)."""
    error: str | None = None
    """Why the record could not be parsed, if it could not."""


class _BadJSON(Exception):
    def __init__(self, msg: str, offset: int):
        super().__init__(msg)
        self.msg = msg
        self.offset = offset  # from the start of the value: the buffer may have moved since


class _Scanner:
    """A forward-only window on a text file: `buf[pos:]` is unread, `line` is the line number at `pos`."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.decoder = json.JSONDecoder()

    def more(self) -> bool:
        """Read another chunk (at least as much as is buffered, so a huge record costs linear time); False at EOF."""
        if self.eof:
            return False
        self.buf = self.buf[self.pos :]  # `line` is already counted up to pos
        self.pos = 0
        try:
            chunk = self.f.read(max(CHUNK_CHARS, len(self.buf)))
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not UTF-8 text ({e.reason} after line {self.line})") from None
        self.buf += chunk
        self.eof = not chunk
        return not self.eof

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def skip(self, chars: str) -> str | None:
        """Move past `chars`; the next character, or None at the end of the file."""
        while True:
            pos, buf = self.pos, self.buf
            while pos < len(buf) and buf[pos] in chars:
                pos += 1
            self.advance(pos)
            if pos < len(buf):
                return buf[pos]
            if not self.more():
                return None

    def decode(self) -> object:
        """The JSON value at `pos` (moving past it), reading more of the file while it may be incomplete."""
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # The chunk ends inside this line: the error may only be the cut. Read on and try again.
                offset = e.pos - self.pos
                if not self.eof and self.buf.find("\n", e.pos) < 0 and self.more():
                    continue
                raise _BadJSON(e.msg, offset) from None
            if end == len(self.buf) and not self.eof and self.more():
                continue  # a number or literal cut at the chunk's end would decode short
            self.advance(end)
            return value

    def skip_line(self) -> None:
        """Move to the start of the next line."""
        while True:
            end = self.buf.find("\n", self.pos)
            if end >= 0:
                self.advance(end + 1)
                return
            self.advance(len(self.buf))
            if not self.more():
                return


def read_records(path: str | Path) -> Iterator[Record]:
    """The records of a JSON array, JSONL or concatenated-JSON file, in order and one at a time. An unparsable
    JSONL line is an error record (reading goes on at the next line); an array that breaks is a `UserError`."""
    path = Path(path)
    try:
        f = path.open(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a record file") from None
    with f:
        scan = _Scanner(f, path)
        first = scan.skip(" \t\r\n")
        if first == "[":
            scan.advance(scan.pos + 1)
            yield from _array(scan)
        elif first is not None:
            yield from _stream(scan)


def _array(scan: _Scanner) -> Iterator[Record]:
    while True:
        nxt = scan.skip(" \t\r\n,")
        if nxt is None:
            raise UserError(f"{scan.path}:{scan.line}: JSON array is not closed")
        if nxt == "]":
            return
        line = scan.line
        try:
            value = scan.decode()
        except _BadJSON as e:
            scan.advance(min(scan.pos + e.offset, len(scan.buf)))
            raise UserError(
                f"{scan.path}:{scan.line}: invalid JSON ({e.msg}); the array cannot be read past this point"
            ) from None
        yield Record(line, value)


def _stream(scan: _Scanner) -> Iterator[Record]:
    """JSON Lines, or JSON values one after another over several lines; blank lines are fine."""
    while scan.skip(" \t\r\n") is not None:
        line = scan.line
        try:
            yield Record(line, scan.decode())
        except _BadJSON as e:
            yield Record(line, None, f"invalid JSON ({e.msg})")
            scan.skip_line()
