"""Where the seconds of `relaygpt run` before its first training step go.

    ray_start     starting the embedded Ray or joining a cluster (only when a stage needs Ray)
    tokenizer     preparing the run's tokenizer (training a BPE, or loading a named one)
    data          token shards and SFT rows
    worker_start  the launcher starting the training processes, until torch.distributed is up on rank 0
    engine_init   rank 0 building its stage: tokenizer, data windows, the DeepSpeed engine, the loader
    resume        rank 0 looking for a checkpoint (a fresh stage records its config instead)
    first_step    the first optimizer step
    other         everything else: starting Python, reading and checking the job, fingerprints, the plan

The driver's phases are timed here, each exclusive of the phases inside it (a Ray started
while the data is prepared counts as ray_start, not data); the worker's come from rank 0's
RUN/<stage>/startup.json (pipelines/train/startup.py), wall clock on the same machine. The
first training stage that runs in this invocation is the one measured; `other` is what is
left of the total, so the phases add up to it.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from pipelines.train.startup import WORKER_MARKS

DRIVER_PHASES = ("ray_start", "tokenizer", "data")
WORKER_PHASES = ("worker_start", "engine_init", "resume", "first_step")  # each ends at the rank 0 mark in the same place


def process_started_at() -> float:
    """When this process started (wall clock), so that the total counts Python's own start and
    imports too: its start in clock ticks after boot (/proc/self/stat) against the time since
    boot (/proc/uptime), both to 10 ms. Where there is no /proc, from now."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()  # fields 3 onwards; the name may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.time()


@dataclass
class StartupClock:
    """The start-up phases of one `relaygpt run`, from `started_at` to the first training step."""

    started_at: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=dict)  # the driver's phases, exclusive
    stage: str | None = None  # the training stage measured
    launcher: str | None = None  # "local" or "ray"
    launched_at: float | None = None
    marks: dict[str, float] | None = None  # rank 0's, once its first step is done
    _open: list[float] = field(default_factory=list)  # seconds spent in phases nested in each open one

    @contextmanager
    def phase(self, name: str):
        """Time the block as `name`, less any phase timed inside it. Once the measured stage
        has been launched, the start-up is over: a later phase (the eval stage starting Ray)
        is not counted."""
        if self.launched_at is not None:
            yield
            return
        start = time.time()
        self._open.append(0.0)
        try:
            yield
        finally:
            nested, elapsed = self._open.pop(), time.time() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._open:
                self._open[-1] += elapsed

    def launching(self, stage: str, launcher: str) -> bool:
        """The driver starts training `stage` now; True when it is the stage measured (the first)."""
        if self.stage is not None:
            return False
        self.stage, self.launcher, self.launched_at = stage, launcher, time.time()
        return True

    def worker_marks(self, marks: dict[str, float]) -> None:
        self.marks = {name: float(marks[name]) for name in WORKER_MARKS}

    @property
    def first_step_seen(self) -> bool:
        return self.marks is not None

    def phases(self) -> dict[str, float]:
        """Seconds per phase that happened, in order; `other` last."""
        out = {name: self.seconds[name] for name in DRIVER_PHASES if name in self.seconds}
        if self.marks is not None:
            out.update(self.stage_phases())
            out["other"] = max(0.0, self.total() - sum(out.values()))
        return out

    def stage_phases(self) -> dict[str, float]:
        """The measured stage's own phases, from its launch to its first step."""
        times = [self.launched_at] + [self.marks[name] for name in WORKER_MARKS]
        return {name: max(0.0, end - start) for name, start, end in zip(WORKER_PHASES, times, times[1:])}

    def total(self) -> float | None:
        return self.marks["first_step"] - self.started_at if self.marks is not None else None

    def record(self) -> dict:
        """For summary.json: the phases, the total, the stage and its launcher (rounded to ms)."""
        total = self.total()
        return {"stage": self.stage, "launcher": self.launcher, "seconds": {k: round(v, 3) for k, v in self.phases().items()},
                "total": round(total, 3) if total is not None else None}

    def stage_record(self) -> dict:
        """For the measured stage's stage.json result: its launcher and phases from launch to first step."""
        phases = self.stage_phases()
        return {"launcher": self.launcher, "seconds": {k: round(v, 3) for k, v in phases.items()},
                "to_first_step": round(sum(phases.values()), 3)}

    def line(self) -> str:
        """`[run] start-up: tokenizer 0.9s, data 2.0s, ..., other 0.6s = 6.1s to the first pretrain step (local launcher)`."""
        parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f}s" for name, seconds in self.phases().items())
        return f"[run] start-up: {parts} = {self.total():.1f}s to the first {self.stage} step ({self.launcher} launcher)"
