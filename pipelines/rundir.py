"""The run directory: the one owner of every path in it, and of its records.

    OUT/<job-name>/<run-id>/
      job.yaml            the resolved job (every default filled in)
      tokenizer/          tokenizer files + identity
      data/<stage>/       shards + manifest.json
      pretrain/ sft/ dpo/ stage.json, metrics.jsonl, messages.jsonl, result.json, checkpoints/, tensorboard/,
                          model/ (native export), workers/ (where each rank ran), startup.json (rank 0's
                          start-up times), ray/
      eval/               stage.json, predictions.jsonl, metrics.json, report.md, tensorboard/
      summary.json
      logs/run.log        Ray's, DeepSpeed's and the workers' own lines; failed stages' tracebacks
      input_hashes.json   sha256 of the files the stages read, cached by (path, size, mtime_ns)
      .relaygpt-output    the marker: relaygpt made this directory (model/owned.py); a folder
                          without it that holds anything is never written to
      .relaygpt-lock      held (flock) by the one process writing here; holds its pid

Nothing else in the project spells these names. `MetricsLog` is the one writer and the one
reader of a stage's metrics.jsonl (rank 0 appends; the driver's progress display, the stage
result and the sweep's measurements read it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model.atomic import write_json_atomically, write_text_atomically
from model.errors import RelayError

TRAINING_STAGES = ("pretrain", "sft", "dpo")
# What eval's `models:` may name instead of a path: the export of each training stage.
EXPORT_NAMES = {"base": "pretrain", "assistant": "sft", "dpo": "dpo"}


def _record(line: str):
    """A line of a step log, or None where it is damaged (a display following a run skips it)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


class MetricsLog:
    """A stage's step log: one JSON object per logged step, appended by rank 0."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0  # how far `new_records` has read

    def append(self, metrics: dict) -> None:
        """One line: the time, then every plain value of `metrics` (nested values are dropped)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        plain = {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str))}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **plain}) + "\n")

    def records(self) -> list[dict]:
        """Every complete line written so far."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RelayError(f"{self.path}: not UTF-8 at byte {exc.start}; {self._advice}") from None
        records = []
        for n, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), start=1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise RelayError(f"{self.path}:{n}: damaged ({exc.__class__.__name__}); {self._advice}") from None
            if not isinstance(record, dict):
                raise RelayError(f"{self.path}:{n}: not a JSON object; {self._advice}")
            records.append(record)
        return records

    @property
    def _advice(self) -> str:
        return f"delete the line, or run the stage again with --from-stage {self.path.parent.name}"

    def last(self) -> dict:
        """The newest value of every key, over all records."""
        merged: dict = {}
        for record in self.records():
            merged.update(record)
        return merged

    def keep_through(self, step: int) -> None:
        """Drop the records after `step` (a resumed stage continues from its checkpoint: what a
        superseded attempt logged beyond it is not history), rewriting the file atomically."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        if self.path.exists() and len(kept) != len(self.records()):
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def follow_from_end(self) -> "MetricsLog":
        """Make `new_records` return only lines written from now on."""
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        return self

    def new_records(self) -> list[dict]:
        """The complete lines written since the previous call (for following a running stage).
        A file rewritten shorter (keep_through on a resume) is followed from its new end."""
        if not self.path.exists():
            return []
        size = self.path.stat().st_size
        if size < self._offset:
            self._offset = size
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [record for line in complete.decode("utf-8", "replace").splitlines() if isinstance(record := _record(line), dict)]


@dataclass(frozen=True)
class StageDir:
    """RUN/<stage>/ of one stage (pretrain, sft or eval)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def status_file(self) -> Path:
        return self.root / "stage.json"

    @property
    def result_file(self) -> Path:
        return self.root / "result.json"

    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.root / "metrics.jsonl")

    @property
    def messages(self) -> MetricsLog:
        """What rank 0 has to tell the person running the stage (a resume, a warning): records
        with a `message`, shown by the driver as lines."""
        return MetricsLog(self.root / "messages.jsonl")

    @property
    def startup(self) -> Path:
        """Rank 0's start-up times of the stage (pipelines/train/startup.py), for the driver's start-up phases."""
        return self.root / "startup.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def reference(self) -> Path:
        """DPO: the reference model's log-probabilities of every prepared pair, computed once per stage."""
        return self.root / "reference"

    @property
    def adapter(self) -> Path:
        """A LoRA stage's adapter alone, in PEFT's layout (adapter_config.json, adapter_model.safetensors)."""
        return self.root / "adapter"

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    def read_status(self) -> dict:
        return json.loads(self.status_file.read_text()) if self.status_file.exists() else {}

    def begin(self, fingerprint: str, inputs: dict[str, str]) -> dict:
        """Record the stage as running (with the inputs it reads, so that a re-run can say which
        one changed); returns that record, for `complete` or `fail`."""
        running = {"stage": self.name, "status": "running", "fingerprint": fingerprint, "inputs": inputs, "started": time.time()}
        self.write_status(running)
        return running

    def complete(self, running: dict, result: dict) -> float:
        """Record the stage begun as `running` as completed with `result`; returns its seconds."""
        seconds = time.time() - running["started"]
        self.write_status({**running, "status": "completed", "seconds": seconds, "result": result})
        return seconds

    def fail(self, running: dict, exc: BaseException) -> None:
        """Record the stage begun as `running` as failed, or interrupted (Ctrl-C), by `exc`."""
        self.write_status({**running, "status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           "error": f"{type(exc).__name__}: {exc}"[:500]})

    def write_status(self, status: dict) -> None:
        write_json_atomically(self.status_file, status, durable=True)  # commits the stage

    def write_result(self, result: dict) -> None:
        write_json_atomically(self.result_file, result, durable=True)

    def result(self) -> dict:
        """A training stage's final result (result.json, written by rank 0 at the end), else its
        last logged metrics (a stage that stopped early)."""
        if self.result_file.exists():
            return json.loads(self.result_file.read_text())
        return {k: v for k, v in self.metrics.last().items() if k not in ("time", "stage")}


@dataclass(frozen=True)
class EvalDir:
    """Where an evaluation writes: RUN/eval/ in a job, or `relaygpt eval --out DIR`."""

    root: Path

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


@dataclass(frozen=True)
class RunDir:
    """OUT/<job-name>/<run-id>/, always absolute (workers on other nodes receive it as is)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def job_file(self) -> Path:
        return self.root / "job.yaml"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def log_file(self) -> Path:
        """RUN/logs/run.log: every line of a run that is not relaygpt's own (Ray, DeepSpeed, the
        workers' output, warnings) and the traceback of a stage that failed."""
        return self.root / "logs" / "run.log"

    @property
    def input_hashes(self) -> Path:
        """The cache of input files' sha256, by (path, size, mtime_ns) (pipelines/inputs.py)."""
        return self.root / "input_hashes.json"

    def data(self, stage: str) -> Path:
        return self.root / "data" / stage

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name)

    def model(self, stage: str) -> Path:
        """A training stage's native export."""
        return self.stage(stage).model

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.root / "eval")

    @property
    def lock_file(self) -> Path:
        return self.root / ".relaygpt-lock"

    def claim(self) -> None:
        """Create the run directory (and its parents) and mark it as relaygpt's; an existing one
        that holds anything without the run marker is a user's folder and is refused."""
        from model.owned import claim

        claim(self.root, "run", "run directory")

    @contextmanager
    def hold(self):
        """The run directory for this process alone, inside the block: an exclusive flock on
        RUN/.relaygpt-lock, which holds the holder's pid. The kernel drops the lock when its
        process ends however it ends, so a crashed run never leaves the directory locked. A
        directory another process holds is refused with that process's pid."""
        import fcntl

        self.claim()
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RelayError(f"run directory {self.root}: cannot create its lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise RelayError(f"run directory {self.root} is in use by another relaygpt process ({who}); "
                             "wait for it to end or stop it, or give another --run-id") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the lock; the file stays (deleting it would race with a waiting process)

    def remove(self, path: str | Path) -> None:
        """Delete `path` (a directory tree or a file) if it exists. Only what lies inside the run
        directory once every symlink is resolved can be deleted: the run directory itself, a path
        outside it or a link leading out of it is refused, so no setting and no link planted in
        the run directory can make a re-run delete anything else."""
        path = Path(path)
        if not path.is_absolute():
            path = self.root / path
        resolved, root = path.resolve(), self.root.resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise RelayError(f"{path}: resolves to {resolved}, which is not inside the run directory {self.root}; "
                             "refusing to delete it")
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)
