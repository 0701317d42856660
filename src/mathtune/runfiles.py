"""Run-directory file I/O: atomic writes and append-only JSONL that survives a crash mid-line.

A file or directory under its final name is always whole: it is written under a temporary name
and renamed. JSONL logs are appended and flushed line by line; a torn last line is dropped with a
warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def write_bytes(path: Path, content: bytes) -> None:
    """Write `content` to a temporary name beside `path`, flush it to the disk, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed write (a full disk) leaves the old file and no debris
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_dir(target: Path, fill: Callable[[Path], None], replace: bool) -> Path:
    """Fill a directory under a name of this process's own, then rename it to `target`.

    A crash never leaves a half directory under the final name, and processes launched together
    (data parallelism) never write into each other's. Where `target` already exists, replace=True
    puts the new directory in its place; replace=False keeps it (the first finished copy stands).
    A fill that raises leaves the target as it was and no partial directory behind.
    """
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        fill(partial)
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(partial, target)
        except OSError:  # the target exists (a directory that is not empty cannot be replaced)
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


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
