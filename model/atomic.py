"""Writing files and directories so that no reader ever sees half of one.

The one atomic writer of the project: everything is written under a temporary name beside its
final place, flushed to disk (fsync), then moved there with one rename (atomic on POSIX file
systems), and the folder holding it flushed too: after a crash or a power cut a reader finds
the old content or the whole new one, never a renamed file whose data never reached the disk.
A write that fails leaves the old content (or nothing) and no temporary file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from model.errors import RelayError


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    if path.is_dir():
        raise RelayError(f"{path}: is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        sync_tree(tmp)
        tmp.replace(path)
        sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise RelayError(f"{out}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        sync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        sync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sync_tree(path: str | Path) -> None:
    """fsync a file, or every file and folder under a directory (before the rename that
    commits it: a checkpoint, a stage, an export)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        sync_dir(Path(folder))


def sync_dir(folder: Path) -> None:
    """fsync a folder, so a rename inside it is on disk (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomically(path: str | Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl_atomically(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
