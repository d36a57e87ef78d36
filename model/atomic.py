"""Writing files and directories so that no reader ever sees half of one.

The one atomic writer of the project: everything is written under a temporary name beside its
final place, then moved there with one rename (atomic on POSIX file systems). A write that
fails leaves the old content (or nothing) and no temporary file behind.

A write that commits something a later run relies on (a checkpoint, a stage's record, its
model or data) is `durable`: its data is flushed to disk (fsync) before the rename and the
folder after it, so that after a crash or a power cut a reader finds the old content or the
whole new one, never a renamed file whose data never reached the disk. Everything else (step
logs, reports, caches) is only atomic: fsync costs a disk flush each time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from model.errors import RelayError


@contextmanager
def atomic_file(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
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
        if durable:
            sync_tree(tmp)
        tmp.replace(path)
        if durable:
            sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out: str | Path, *, durable: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    With `kind` (model/owned.py), `out` is an output of its own: it is replaced only when it is
    absent, empty or carries that kind's marker (a user's folder is refused before anything is
    written), and the new directory carries the marker."""
    from model.owned import check_owned, mark

    out = Path(out)
    if kind is not None:
        check_owned(out, kind, "output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise RelayError(f"{out}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if kind is not None:
            mark(tmp, kind)
        if durable:
            sync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        if durable:
            sync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sync_tree(path: str | Path) -> None:
    """fsync a file, or every file and folder under a directory."""
    path = Path(path)
    if path.is_file():
        _fsync_file(path)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync_file(Path(folder) / name)
        sync_dir(Path(folder))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        try:
            os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno not in CANNOT_SYNC:
                raise  # an I/O error: the data may not be on disk, so do not commit it


# What a file system that does not implement fsync answers (some FUSE and network mounts):
# there the write stays atomic but cannot be made durable, as before.
CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def sync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename inside it is on disk (where the file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str, *, durable: bool = False) -> None:
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomically(path: str | Path, data, *, durable: bool = False) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n", durable=durable)


def write_jsonl_atomically(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
