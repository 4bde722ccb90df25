"""JSON Lines that survive a killed process or a full disk (metrics.jsonl).

A writer that dies mid-line, or a disk that fills mid-line, leaves a torn last record: bytes without a
closing newline, not valid JSON. Every reader skips such a last line (and only the last: a bad record in
the middle is an error naming its line); an appending writer first cuts it off, so the file stays one record
per line; and this writer never leaves one itself when a write fails (it truncates back to the last whole
record before raising). Standard library only: launch.sh reads metrics with it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_jsonl(path, missing_ok: bool = True) -> list[dict]:
    """Every record of a JSON Lines file; a torn last line is skipped. [] for a missing file (missing_ok)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (b"" when the file is whole)
    out = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
            if i == len(complete) and not tail.strip():  # a torn last record that got a newline after all
                break
            raise ValueError(f"{path}, line {i}: not a JSON record ({e})") from None
    if tail.strip():
        try:
            out.append(json.loads(tail))  # a whole record that only lacks its newline
        except ValueError:
            pass  # torn: the writer died or the disk filled in the middle of it
    return out


def torn_tail_bytes(path) -> int:
    """How many bytes after the last newline do not form a record (0 when the file ends cleanly)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (1 << 20)))
            data = f.read()
    except FileNotFoundError:
        return 0
    if not data or data.endswith(b"\n"):
        return 0
    tail = data.rsplit(b"\n", 1)[-1]
    try:
        json.loads(tail)
        return -1  # a whole record without its newline: complete it rather than cut it
    except ValueError:
        return len(tail)


class JsonlAppender:
    """Appends one record per line, each written whole or not at all. Opening cuts off a torn last record
    left by an earlier writer (repaired_bytes says how many bytes went)."""

    def __init__(self, path):
        self.path = Path(path)
        self.repaired_bytes = 0
        torn = torn_tail_bytes(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        size = os.fstat(self.fd).st_size
        if torn > 0:
            os.ftruncate(self.fd, size - torn)
            self.repaired_bytes = torn
        elif torn < 0:
            self._write_all(b"\n")

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        start = os.fstat(self.fd).st_size
        try:
            self._write_all(data)
        except OSError:
            try:
                os.ftruncate(self.fd, start)  # no torn record: the file ends with the last whole one
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
