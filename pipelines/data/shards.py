"""Packed token shards on disk and the manifest that vouches for them.

A shard is a flat little-endian array (`uint16` when every id fits, else `uint32`) that is
memory-mapped at training time and read in place (ShardedTokens). `manifest.json` records the tokenizer identity, dtype, counts,
the sha256 of every shard and the fingerprint of the inputs; a stage directory is written
under a temporary name and renamed into place, so a crash never leaves one looking complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from model.errors import RelayError

MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"  # the manifest's own sha256, for the quick check at every start
FORMAT_VERSION = 1


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """Append arrays; roll to a new file every `shard_items` items; hash as it writes."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_items: int) -> None:
        self.directory, self.prefix, self.dtype, self.shard_items = directory, prefix, np.dtype(dtype), shard_items
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._count = 0
        self.shards.append({"file": name})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(items=self._count, sha256=self._hash.hexdigest())
            self._file = None

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        start = 0
        while start < len(array):
            if self._file is None or self._count >= self.shard_items:
                self._close_current()
                self._open()
            take = min(len(array) - start, self.shard_items - self._count)
            data = array[start : start + take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            start += take

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def write_manifest(directory: Path, manifest: dict) -> None:
    """manifest.json, and its sha256 beside it (verify_shards' quick check reads it)."""
    (directory / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n", encoding="utf-8")
    (directory / MANIFEST_DIGEST).write_text(sha256_of(directory / MANIFEST) + "\n", encoding="utf-8")


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RelayError(f"{path}:{exc.lineno}: invalid manifest ({exc.msg})") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(directory: Path, manifest: dict | None = None, *, full: bool = False) -> None:
    """Refuse a data directory whose shards no longer match their manifest (names the file).

    The quick check (every training start) reads no shard: the manifest must match the
    digest written beside it, and every shard must exist with the size its item count gives,
    which catches a truncated, extended or missing file. `full` re-hashes every shard against
    its sha256 (`relaygpt data verify`; preparation hashed them as it wrote them)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise RelayError(f"{directory}: no {MANIFEST}; prepare the data first (relaygpt data prepare)")
    recorded = directory / MANIFEST_DIGEST
    if recorded.exists() and recorded.read_text(encoding="utf-8").strip() != sha256_of(directory / MANIFEST):
        raise RelayError(f"{directory / MANIFEST}: changed since it was written (its digest is in {MANIFEST_DIGEST}); "
                         "re-run relaygpt data prepare")
    dtype = np.dtype(manifest["dtype"])
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for key, digest, itemsize in (("file", "sha256", dtype.itemsize), ("mask_file", "mask_sha256", 1)):
                if key not in shard:
                    continue
                path = directory / shard[key]
                if not path.exists():
                    raise RelayError(f"{path}: shard listed in the manifest is missing")
                size = path.stat().st_size
                if size != shard["items"] * itemsize:
                    raise RelayError(f"{path}: {size} bytes, the manifest says {shard['items']} items of {itemsize} "
                                     f"({shard['items'] * itemsize} bytes); the shard was modified — re-run relaygpt data prepare")
                if full and sha256_of(path) != shard[digest]:
                    raise RelayError(f"{path}: sha256 no longer matches {directory / MANIFEST}; the shard was modified — re-run relaygpt data prepare")


class ShardedTokens:
    """A split's shards as one read-only sequence. A position is found by binary search over
    the shards' starts and read with `pread` into a new array, so a rank holds only the windows
    it asked for: nothing is concatenated, and nothing stays mapped (a memory map leaves every
    page it touched resident: measured, 134 MiB of a 128 MiB corpus after 50 batches)."""

    MAX_OPEN = 64  # shard files kept open at once

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths, self.dtype = [Path(p) for p in paths], np.dtype(dtype)
        self.starts = np.cumsum([0] + list(counts), dtype=np.int64)
        self._open: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens slices take step 1")
            return self._range(start, max(start, stop))
        index = int(key)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._range(index, index + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            base, end = int(self.starts[shard]), int(self.starts[shard + 1])
            take = min(stop, end)
            parts.append(self._read(shard, start - base, take - base))
            start, shard = take, shard + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def _read(self, shard: int, start: int, stop: int) -> np.ndarray:
        fd = self._open.pop(shard, None)
        if fd is None:
            if len(self._open) >= self.MAX_OPEN:
                os.close(self._open.pop(next(iter(self._open))))
            fd = os.open(self.paths[shard], os.O_RDONLY)
        self._open[shard] = fd  # most recently used last
        size = (stop - start) * self.dtype.itemsize
        data = os.pread(fd, size, start * self.dtype.itemsize)
        if len(data) != size:
            raise RelayError(f"{self.paths[shard]}: shorter than its manifest says; re-run relaygpt data prepare")
        return np.frombuffer(data, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):
        whole = self._range(0, len(self))
        return np.asarray(whole, dtype=dtype) if dtype is not None else np.asarray(whole)

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)
        self._open = {}


def load_split(directory: Path, manifest: dict, split: str, key: str = "file") -> ShardedTokens:
    """The shards of a split, read in place (ShardedTokens)."""
    dtype = np.dtype(manifest["dtype"]) if key == "file" else np.dtype(np.uint8)
    shards = [s for s in manifest["splits"][split]["shards"] if s.get("items", 1)]
    return ShardedTokens([Path(directory) / s[key] for s in shards], [s["items"] for s in shards], dtype)
