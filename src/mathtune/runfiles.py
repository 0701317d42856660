"""Run-directory file I/O: atomic writes and append-only JSONL that survives a crash mid-line.

A file under its final name is always whole: it is written to a temporary name and renamed.
JSONL logs are appended and flushed line by line; a torn last line is dropped with a warning.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed write (a full disk) leaves the old file and no debris
        raise


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Records of a JSONL file; a torn last line (a crash mid-write) is reported and dropped.

    With repair, the torn line is also cut from the file so that appending can go on.
    A bad line anywhere else is corruption, not a crash, and raises.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            is_last = all(not rest.strip() for rest in lines[number:])
            if not is_last:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg}); the file is corrupt") from exc
            print(f"warning: {path}:{number}: dropped a torn last line (an interrupted write)", file=sys.stderr)
            if repair:
                write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))
    return records
