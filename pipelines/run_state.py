"""Checks of an output path and of a run directory's state, made before a run starts.

An output path (`output_dir`, `--out`, `--run-dir`) must be able to hold a directory: not a
file, not too long for the filesystem, on a writable filesystem that holds files (not /proc).
A run directory left by an earlier run must still have the shape relaygpt gave it (a
`checkpoints/` that became a file, a `logs/run.log` that became a directory) and state files
that parse (`stage.json`, `metrics.jsonl`, `tokenizer/source.json`): anything else is one line
naming the path and what to do, instead of a traceback in the middle of a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.errors import RelayError

MAX_PATH = 4000  # PATH_MAX is 4096; the run directory adds a few names below the path given
MAX_NAME = 255   # NAME_MAX of every common filesystem
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def output_path_problem(path: str | Path, field: str) -> str | None:
    """Why `path` cannot hold relaygpt's output (named by `field`), or None. Creates nothing."""
    path = Path(path).expanduser().absolute()
    if len(str(path)) > MAX_PATH:
        return f"{field}: the path is {len(str(path))} characters long; at most {MAX_PATH}"
    long_part = next((part for part in path.parts if len(part.encode()) > MAX_NAME), None)
    if long_part is not None:
        return f"{field}: {long_part[:40]}... is {len(long_part.encode())} bytes long; a file name holds at most {MAX_NAME}"
    resolved = path.resolve()
    pseudo = next((p for p in PSEUDO_FILESYSTEMS if resolved.is_relative_to(p)), None)
    if pseudo is not None:
        return f"{field}: {path} lies under {pseudo}, which holds no files of ours; choose a normal folder"
    for existing in (path, *path.parents):
        if existing.exists() or existing.is_symlink():
            break
    if not existing.is_dir():
        what = "a broken link" if not existing.exists() else "a file"
        return f"{field}: {existing} is {what}, not a directory; give a directory for the output"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{field}: {existing} is not writable by this user; choose a folder you can write to"
    return None


def check_output_path(path: str | Path, field: str) -> None:
    problem = output_path_problem(path, field)
    if problem:
        raise RelayError(problem)


# What relaygpt makes inside a run directory, by kind ("dir" / "file"), relative to RUN.
_LAYOUT = {"logs": "dir", "logs/run.log": "file", "job.yaml": "file", "summary.json": "file", "input_hashes.json": "file",
           "tokenizer": "dir", "tokenizer/source.json": "file", "data": "dir", "eval": "dir"}
_STAGE_LAYOUT = {"": "dir", "checkpoints": "dir", "stage.json": "file", "metrics.jsonl": "file", "model": "dir"}


def run_dir_problems(root: Path, stages: list[str], rerun: set[str] = frozenset()) -> list[str]:
    """Paths of the run directory `root` with the wrong kind, and damaged state files; a stage in
    `rerun` (--from-stage) is made again, so its old state files are not read."""
    root = Path(root)
    if not root.is_dir():
        return []
    layout = dict(_LAYOUT)
    for stage in stages:
        layout.update({f"{stage}/{name}".rstrip("/"): kind for name, kind in _STAGE_LAYOUT.items()})
    problems = []
    for name, kind in layout.items():
        path = root / name
        if path.exists() and (path.is_dir() != (kind == "dir")):
            problems.append(f"{path}: is a {'directory' if path.is_dir() else 'file'} where relaygpt keeps a {kind}; "
                            f"move it away or delete it")
    if problems:
        return problems
    for stage in stages:
        if stage in rerun:
            continue
        hint = f"re-run the stage with --from-stage {stage}, or delete {root / stage}"
        problems += _json_problems(root / stage / "stage.json", hint, lines=False)
        problems += _json_problems(root / stage / "metrics.jsonl", hint, lines=True)
    if "data" not in rerun:
        problems += _json_problems(root / "tokenizer" / "source.json", f"re-run with --from-stage data, or delete {root / 'tokenizer'}",
                                   lines=False)
    return problems


def _json_problems(path: Path, hint: str, lines: bool) -> list[str]:
    """[one line] when `path` exists and is not a JSON object (each complete line one, for a
    JSON-lines log, whose unfinished last line is ignored as its readers ignore it)."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [f"{path}: damaged (not UTF-8 text at byte {exc.start}); {hint}"]
    except OSError as exc:
        return [f"{path}: cannot be read ({exc.strerror}); {hint}"]
    chunks = text[: text.rfind("\n") + 1].splitlines() if lines else [text]
    for number, chunk in enumerate(chunks, start=1):
        try:
            value = json.loads(chunk)
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            return [f"{path}{f':{number}' if lines else ''}: damaged ({detail}); {hint}"]
        if not isinstance(value, dict):
            return [f"{path}{f':{number}' if lines else ''}: damaged (a JSON object was expected); {hint}"]
    return []
