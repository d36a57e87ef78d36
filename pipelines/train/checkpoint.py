"""Training checkpoints: DeepSpeed writes, we commit atomically and find the newest good one.

Every rank writes its part into `checkpoints/.tmp-step_NNNNNNNN/`; after a barrier the ranks
hash the files between them (sha256, streamed) and rank 0 records `checkpoint.json` (step, and
the size and sha256 of every file of the tag, whichever rank wrote it), then renames the
directory to `step_NNNNNNNN`, so a checkpoint either exists complete or does not exist.

On resume the newest committed checkpoint whose every file matches its record (size, then
sha256; no file missing, none added) is used, before any rank calls DeepSpeed's load. A damaged
one (truncated, altered, corrupted) is skipped with a warning that names the file, and the next
older one is tried. The record catches corruption, not tampering: whoever can write a file can
rewrite the record too. So DeepSpeed's own loader, which calls `torch.load(weights_only=False)`
and would run whatever code a pickle names, is never used: every file it reads back goes through
`load_file`, torch's weights-only unpickler with only the few DeepSpeed classes its checkpoints
hold allowed besides tensors and containers (`WeightsOnlyLoading`). A file that names anything
else is refused, naming the file, and nothing in it runs. Only the newest K are kept. A
multi-node run needs the run directory on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from model.atomic import sync_dir, sync_tree
from model.errors import RelayError
from model.tokenizer import sha256_file

MANIFEST = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def temp_tag(step: int) -> str:
    return f".tmp-{tag_for(step)}"


def files_of(directory: Path) -> list[str]:
    """Every file of a checkpoint directory by its relative name, sorted; the record excepted."""
    return sorted(name for p in directory.rglob("*") if p.is_file() and (name := str(p.relative_to(directory))) != MANIFEST)


def share(names: list[str], part: tuple[int, int]) -> list[str]:
    """The names rank `part[0]` of `part[1]` hashes: every rank a different slice, together all."""
    index, count = part
    return names[index::count]


def describe(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of the named files of `directory`, each read as a stream."""
    return {name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)} for name in names}


def commit(root: Path, step: int, files: dict[str, dict] | None = None, extra: dict | None = None) -> Path:
    """Rank 0, after every rank has written: the record, then the atomic rename. `files` are the
    ranks' shares of `describe` merged; whatever file of the tag they left out is hashed here, so
    the record covers every file the directory holds."""
    tmp, final = root / temp_tag(step), root / tag_for(step)
    files = files or {}
    listed = files_of(tmp)
    assert set(files) <= set(listed), f"hashed files that are not in {tmp}: {sorted(set(files) - set(listed))}"
    files = {**files, **describe(tmp, [name for name in listed if name not in files])}
    record = {"step": step, "time": time.time(), "files": {name: files[name] for name in listed}, **(extra or {})}
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    sync_tree(tmp)  # every file on disk before the rename commits the checkpoint (model/atomic.py)
    if final.exists():  # a re-run of the same step (e.g. after resuming): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    sync_dir(root)
    return final


def _recorded(path: Path) -> dict[str, dict] | str:
    """The files a checkpoint's record lists, or why there is no usable record."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no checkpoint.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return "unreadable checkpoint.json"
    if not isinstance(files, dict) or not all(isinstance(f, dict) and {"size", "sha256"} <= f.keys() for f in files.values()):
        return "checkpoint.json records no sha256 of its files (written before checkpoints were hashed), so it cannot be verified"
    return files


def problem_with(path: Path, part: tuple[int, int] = (0, 1)) -> str | None:
    """Why a committed checkpoint cannot be used, or None when every file matches its record.
    Names, existence and sizes are checked whole (cheap); the sha256 of `share(part)` only, so
    that ranks verifying together each read a slice."""
    files = _recorded(path)
    if isinstance(files, str):
        return files
    unrecorded = sorted(set(files_of(path)) - set(files))
    if unrecorded:
        return f"{unrecorded[0]} is not in checkpoint.json (added after the checkpoint was written)"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} is {f.stat().st_size} bytes, expected {want['size']} (truncated?)"
    for name in share(sorted(files), part):
        if sha256_file(path / name) != files[name]["sha256"]:
            return f"{name} does not match the sha256 recorded in checkpoint.json (altered or corrupted)"
    return None


def committed(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def newest_usable(root: Path, warn, part: tuple[int, int] = (0, 1), agree: Callable[[str | None], str | None] = lambda r: r,
                  candidates: list[tuple[int, Path]] | None = None) -> tuple[int, str] | None:
    """(step, tag) of the newest checkpoint whose files all match its record; damaged ones are
    reported via `warn`. Ranks verifying together pass their `part` (rank, world size), the same
    `candidates` (rank 0's `committed`) and an `agree` that returns the first problem any rank
    found (a collective), so that all of them choose the same checkpoint."""
    for step, path in committed(root) if candidates is None else candidates:
        reason = agree(problem_with(path, part))
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


# ---- loading without unpickling code -------------------------------------------------------

def deepspeed_types() -> list[type]:
    """The classes, besides tensors, containers, numbers and strings, that DeepSpeed's checkpoint
    files hold: a ZeRO or bf16 optimizer's loss scaler (static; dynamic under fp16), its ZeRO
    stage and its map of parameter slices. Found by saving checkpoints under ZeRO 0-3, bf16,
    pipeline 2 and pipeline 2 with ZeRO-1 and listing what each file names
    (torch.serialization.get_unsafe_globals_in_checkpoint); model and pipeline-layer files name
    none. Allowing them calls nothing but their own construction (an Enum by value, the others
    by restoring their attributes)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path, map_location=None):
    """One checkpoint file, read by torch's weights-only unpickler with `deepspeed_types` allowed.
    A file that names any other global (a crafted pickle: `os.system`, a `__reduce__` of its own)
    is refused with a RelayError naming the file and what it named; nothing it names is called."""
    import torch

    with torch.serialization.safe_globals(deepspeed_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise RelayError(f"checkpoint file {path}: {_why_refused(path)}; it was not loaded (checkpoints are read "
                             f"as data, never as code): delete {Path(path).parent} to resume from an older checkpoint, "
                             "or run the stage afresh") from None


def _why_refused(path) -> str:
    """What makes a file unloadable as data: the globals it names beyond the allowed ones (read
    from its opcodes, without running them), else that it is not a torch checkpoint at all."""
    import torch

    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in deepspeed_types()}
    try:
        names = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:  # not even a readable archive: there is nothing to list
        names = []
    if names:
        return f"it names {', '.join(names[:3])}, which a checkpoint never holds and which loading would call"
    return "it is not a file torch can read as checkpoint data"


class WeightsOnlyLoading:
    """The checkpoint engine DeepSpeed built, with its `load` replaced by `load_file`. DeepSpeed
    reads every file of `load_checkpoint` through its engine's `load` (model states, ZeRO
    optimizer shards, pipeline layers); saving and everything else is the engine's own."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def load(self, path, map_location=None):
        return load_file(path, map_location)

    def __getattr__(self, name):
        return getattr(self.inner, name)
