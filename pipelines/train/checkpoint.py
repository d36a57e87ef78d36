"""Training checkpoints: DeepSpeed writes, we commit atomically and find the newest good one.

Every rank writes its part into `checkpoints/.tmp-step_NNNNNNNN/`; after a barrier rank 0
records `checkpoint.json` (step and the size of every file) and renames the directory to
`step_NNNNNNNN`, so a checkpoint either exists complete or does not exist. On resume the
newest committed checkpoint whose files all match the manifest is used; a damaged one (a file
truncated or missing) is skipped with a warning that names it. Only the newest K are kept.
A multi-node run needs the run directory on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

MANIFEST = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def temp_tag(step: int) -> str:
    return f".tmp-{tag_for(step)}"


def commit(root: Path, step: int, extra: dict | None = None) -> Path:
    """Rank 0, after every rank has written: manifest, then the atomic rename."""
    tmp, final = root / temp_tag(step), root / tag_for(step)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "time": time.time(), "files": files, **(extra or {})}, indent=2) + "\n")
    if final.exists():  # a re-run of the same step (e.g. after resuming): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def problem_with(path: Path) -> str | None:
    """Why a committed checkpoint cannot be used, or None when it is complete."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no checkpoint.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable checkpoint.json"
    for name, size in files.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def committed(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def newest_usable(root: Path, warn) -> tuple[int, str] | None:
    """(step, tag) of the newest complete checkpoint; damaged ones are reported via `warn`."""
    for step, path in committed(root):
        reason = problem_with(path)
        if reason is None:
            return step, path.name
        warn(f"skipping checkpoint {path}: {reason}")
    return None


def drop_unfinished(root: Path) -> None:
    """Remove leftovers of interrupted writes (never committed, so never resumed from)."""
    for path in root.glob(".tmp-step_*"):
        shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and drop leftovers of interrupted writes."""
    for _, path in committed(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
    drop_unfinished(root)
