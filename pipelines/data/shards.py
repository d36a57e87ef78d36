"""Packed token shards on disk and the manifest that vouches for them.

A shard is a flat little-endian array (`uint16` when every id fits, else `uint32`) that is
memory-mapped at training time. `manifest.json` records the tokenizer identity, dtype, counts,
the sha256 of every shard and the fingerprint of the inputs; a stage directory is written
under a temporary name and renamed into place, so a crash never leaves one looking complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from model.errors import RelayError

MANIFEST = "manifest.json"
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
    (directory / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n", encoding="utf-8")


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


def verify_shards(directory: Path, manifest: dict | None = None) -> None:
    """Refuse a data directory whose shards no longer match their manifest (names the file)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise RelayError(f"{directory}: no {MANIFEST}; prepare the data first (relaygpt data prepare)")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for key in ("file", "mask_file"):
                if key not in shard:
                    continue
                path = directory / shard[key]
                if not path.exists():
                    raise RelayError(f"{path}: shard listed in the manifest is missing")
                expected = shard["sha256" if key == "file" else "mask_sha256"]
                if sha256_of(path) != expected:
                    raise RelayError(f"{path}: sha256 no longer matches {directory / MANIFEST}; the shard was modified — re-run relaygpt data prepare")


def load_split(directory: Path, manifest: dict, split: str, key: str = "file") -> np.ndarray:
    """All shards of a split as one array (memory-mapped; concatenated only when several)."""
    dtype = np.dtype(manifest["dtype"]) if key == "file" else np.dtype(np.uint8)
    arrays = [np.memmap(Path(directory) / s[key], dtype=dtype, mode="r") for s in manifest["splits"][split]["shards"] if s.get("items", 1)]
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
