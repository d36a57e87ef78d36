"""What a stage read: the files behind its fingerprint, hashed by content.

A stage's fingerprint covers its settings and the contents of the files it reads (local data
sources, a tokenizer file or directory, an init model directory), so a changed file re-runs
the stage and every stage after it. Files are hashed streaming, a block at a time.

Hashing a large corpus on every re-run would be slow, so digests are cached in
RUN/input_hashes.json, keyed by (path, size, mtime_ns): a file rewritten with the same size
gets a new mtime and is hashed again. A file modified within one timestamp tick of being
hashed could keep its mtime (coarse filesystem clocks), so a digest is cached only for a file
left alone for `SETTLED_NS` before it was hashed and unchanged while it was (git's "racily
clean" rule). Setting an mtime back by hand (touch -d) on new bytes of the same size is not seen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from model.atomic import write_json_atomically
from pipelines.data.shards import sha256_of

SETTLED_NS = 2_000_000_000  # coarser than any filesystem's mtime tick (FAT: 2 s)


class FileHashes:
    """sha256 of files by content, cached in `cache` (a JSON file) when given."""

    def __init__(self, cache: Path | None = None) -> None:
        self.cache = None if cache is None else Path(cache)
        self._entries: dict[str, dict] = {}
        self._dirty = False
        if self.cache is not None and self.cache.exists():
            try:
                entries = json.loads(self.cache.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                entries = None
            self._entries = entries if isinstance(entries, dict) else {}  # a damaged cache only costs hashing again

    def sha256(self, path: Path) -> str:
        key = str(Path(path).resolve())
        before = os.stat(key)
        hit = self._entries.get(key)
        if isinstance(hit, dict) and (hit.get("size"), hit.get("mtime_ns")) == (before.st_size, before.st_mtime_ns):
            return hit["sha256"]
        started = time.time_ns()
        digest = sha256_of(Path(key))
        after = os.stat(key)
        settled = started - before.st_mtime_ns > SETTLED_NS
        if settled and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
            self._entries[key] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": digest}
            self._dirty = True
        return digest

    def directory(self, root: Path, label: str) -> dict[str, str]:
        """{label/relative path: sha256} of every file under `root` (hidden files and folders aside)."""
        root = Path(root)
        out = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root)
            if not any(part.startswith(".") for part in relative.parts):
                out[f"{label}/{relative.as_posix()}"] = self.sha256(path)
        return out

    def save(self) -> None:
        """Write the cache (when something new was hashed)."""
        if self.cache is not None and self._dirty:
            write_json_atomically(self.cache, self._entries)
            self._dirty = False


def describe_change(before: dict[str, str] | None, after: dict[str, str]) -> str | None:
    """`corpus.txt (sha256 ab12… → cd34…)` for the first input that differs (`and N more`), or None."""
    if before is None:
        return None  # recorded before inputs were: nothing to compare with
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        return None
    first = changed[0]
    old, new = before.get(first), after.get(first)
    if old is None:
        what = f"{first} (new file)"
    elif new is None:
        what = f"{first} (no longer there)"
    else:
        what = f"{first} (sha256 {old[:8]}… → {new[:8]}…)"
    return what + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
