"""Writing a file so that no reader ever sees half of it: a temporary name beside it, then one
rename over the final name (atomic on POSIX file systems)."""

from __future__ import annotations

from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
