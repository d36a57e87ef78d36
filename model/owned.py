"""Output directories relaygpt owns: the marker that says so, and the check before a write.

Every directory a command writes as a whole (a run directory, a model directory, an eval
`--out`, a tokenizer, a sweep) carries a marker file, `.relaygpt-output`, naming what kind of
output it is. A command writes into, replaces or deletes a directory only when it is absent,
empty, or carries the marker of the same kind; anything else is a user's folder and is refused
with its path before anything is written. The marker's content is fixed (no time, no pid), so
a directory's files hash the same however often it is rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.errors import RelayError

MARKER = ".relaygpt-output"
KINDS = ("run", "model", "eval", "tokenizer", "sweep")
DESCRIBED = {"run": "a run directory", "model": "a model directory", "eval": "an evaluation output",
             "tokenizer": "a tokenizer directory", "sweep": "a sweep's output"}


def marker_kind(directory: str | Path) -> str | None:
    """The kind a directory's marker names, or None where it has no (readable) marker."""
    path = Path(directory) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if kind in KINDS else None


def check_owned(directory: str | Path, kind: str, label: str) -> None:
    """Refuse `directory` as the output of `kind` unless it is absent, empty or carries that
    kind's marker. `label` names where the path came from (`--out`, `run directory`)."""
    assert kind in KINDS, kind
    path = Path(directory)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() and not path.exists():
        raise RelayError(f"{label} {path}: is a broken symbolic link; give a directory path")
    if not path.is_dir():
        raise RelayError(f"{label} {path}: exists and is not a directory; give a new or empty directory")
    found = marker_kind(path) or _written_before_markers(path)
    if found == kind:
        return
    if found is not None:
        raise RelayError(f"{label} {path}: is {DESCRIBED[found]} of relaygpt, not {DESCRIBED[kind]}; "
                         "refusing to write there (give another directory)")
    try:
        occupied = next(path.iterdir(), None) is not None
    except OSError as exc:
        raise RelayError(f"{label} {path}: cannot be read ({exc.strerror or exc})") from None
    if occupied:
        raise RelayError(f"{label} {path}: holds files relaygpt did not write (no {MARKER} marker); "
                         "refusing to write there (give a new or empty directory)")


def _written_before_markers(path: Path) -> str | None:
    """The kind of an output relaygpt wrote before it marked its outputs, told by the files only
    relaygpt writes there together (so that runs and exports made earlier stay usable)."""
    def has(*names: str) -> bool:
        return all((path / name).is_file() for name in names)

    if has("job.yaml") and (has("summary.json") or any((path / s / "stage.json").is_file() for s in ("data", "pretrain", "sft", "dpo", "eval"))):
        return "run"
    if has("config.json"):
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        if isinstance(config, dict) and (config.get("format") == "relaygpt-native" or isinstance(config.get("relaygpt"), dict)):
            return "model"
    if has("tokenizer.json", "ranks.tiktoken"):
        return "tokenizer"
    if has("predictions.jsonl", "metrics.json", "report.md"):
        return "eval"
    return None


def mark(directory: str | Path, kind: str) -> None:
    """Write the marker of `kind` into an existing directory."""
    assert kind in KINDS, kind
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "relaygpt", "kind": kind}) + "\n", encoding="utf-8")


def claim(directory: str | Path, kind: str, label: str) -> Path:
    """Check `directory` (check_owned), create it and its parents, and mark it as `kind`."""
    path = Path(directory)
    check_owned(path, kind, label)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if marker_kind(path) != kind:
            mark(path, kind)
    except NotADirectoryError:
        raise RelayError(f"{label} {path}: a parent of it is a file, not a directory") from None
    except OSError as exc:
        raise RelayError(f"{label} {path}: cannot be written ({exc.strerror or exc})") from None
    return path
