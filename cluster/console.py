"""What a person sees while a run goes: relaygpt's own lines and one live progress line.

Everything else a run's processes print (Ray's and DeepSpeed's loggers, the training workers'
output that Ray forwards to the driver, C++ log lines, warnings) goes to the run's log file:
`output_to(path)` points this process's stdout and stderr (the file descriptors, so output of
native code and of child processes too) at that file for the duration of the block, while a
`terminal()` Console keeps writing where stdout pointed before.

On a terminal the progress line is redrawn in place; anywhere else (a pipe, a CI log, a Ray
Job's log) each update is a line of its own, so nothing is lost to carriage returns.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from contextlib import contextmanager, suppress
from typing import Callable
from pathlib import Path


class Console:
    """Lines that stay (`line`) and one progress line that the next update replaces (`progress`).

    A reader that goes away (`relaygpt run ... | head`) ends the output quietly: the first write
    that finds the pipe closed turns every later one into nothing, and the run goes on (its
    results are on disk; a training run is not thrown away because a viewer closed)."""

    def __init__(self, stream, *, live: bool | None = None, width: int | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.width = width or _terminal_width(stream)
        self.closed = False  # the reader went away
        self._shown = ""  # the progress line now on screen (live only)
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            if self._shown:
                self._write("\r" + " " * len(self._shown) + "\r")
            self._write(text + "\n")
            if self._shown:
                self._write(self._shown)

    def progress(self, text: str | None) -> None:
        """Replace the progress line with `text`; None keeps the current one as a line (`done`)."""
        if text is None:
            self.done()
            return
        if not self.live:
            self.line(text)
            return
        text = text[: self.width - 1]
        with self._lock:
            pad = max(0, len(self._shown) - len(text))
            self._write("\r" + text + " " * pad + ("\b" * pad))
            self._shown = text

    def done(self) -> None:
        """Keep the progress line on screen as it last was, and start a new line below it."""
        with self._lock:
            if self._shown:
                self._write("\n")
                self._shown = ""

    def _write(self, text: str) -> None:
        """Write and flush (called with the lock held); a closed reader silences the console."""
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self._close()

    def _close(self) -> None:
        """Stop writing to a stream whose reader is gone. What its buffer still holds must not
        be flushed again (at exit that prints a BrokenPipeError): its descriptor now points at
        /dev/null, so the stream can close, or the interpreter flush it, harmlessly."""
        self.closed = True
        with suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)


def _terminal_width(stream) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        columns = 0
    return columns if columns > 0 else 120  # a terminal that does not say its size (a fresh pty) reports 0


def bar(done: int, total: int, width: int = 24) -> str:
    """`[#########...............]` for done of total."""
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def step_bar(metrics: dict) -> str:
    """A training stage's logged step (a metrics.jsonl record) as a progress line."""
    done, total = metrics["step"], metrics["total_steps"]
    line = f"[{metrics['stage']}] {bar(done, total)} {done}/{total}"
    if "train/loss" in metrics:
        line += (f"  loss {metrics['train/loss']:.4f}  {metrics['perf/tokens_per_s'] / 1000:.1f}k tok/s"
                 f"  eta {eta(metrics.get('eta_s'))}")
    return line


class RateMeter:
    """Rows per second and the time left, from the start of a piece of work."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()

    def eta_s(self, done: int) -> float | None:
        elapsed = time.perf_counter() - self.start
        return elapsed * (self.total - done) / done if done else None


@contextmanager
def output_to(log: Path):
    """Send this process's stdout and stderr (fds 1 and 2, so native code and child processes
    too) to `log`, appended, inside the block. They are restored whatever happens inside
    (an error, Ctrl-C) or while flushing at the end (a full disk)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _flush()
    saved: dict[int, int] = {}
    try:
        for fd in (1, 2):
            saved[fd] = os.dup(fd)
        os.write(target, f"\n==== relaygpt {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
        for fd in (1, 2):
            os.dup2(target, fd)
        yield
    finally:
        try:
            _flush()
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            os.close(target)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with suppress(OSError, ValueError):
                stream.flush()


def terminal() -> Console:
    """A Console on what stdout is now (its own copy of the descriptor, so it stays on the
    terminal while `output_to` points stdout elsewhere)."""
    if sys.stdout is None:  # started with stdout closed: nothing to show, nowhere to fail
        return Console(open(os.devnull, "w"), live=False)
    _flush()
    try:
        fd = os.dup(sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout is not a file (captured in-process)
        return Console(sys.stdout, live=False)
    return Console(os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace"), live=os.isatty(fd))


def quiet_ray() -> None:
    """Ray's forwarded worker lines as printed, whole (no "repeated 3x across cluster" folding)
    and without colour codes: they go to a log file. Read by Ray when it is imported."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")


@contextmanager
def third_party_to(log: Path):
    """Inside the block, everything this process and its children print goes to `log` (Ray,
    DeepSpeed, worker output); the yielded Console writes relaygpt's own lines to the terminal."""
    quiet_ray()
    console = terminal()
    try:
        with output_to(Path(log)):
            yield console
    finally:
        console.done()


class ProgressWatcher:
    """Follows a stage's step log and messages (both written by rank 0): each message is a line;
    each logged step updates the progress display (`live`), or is a line where there is none;
    a step with a validation result is always a line. Rank 0's start-up marks (`startup`, a
    file written at its first step) go to `on_startup` as soon as they appear."""

    def __init__(self, log, messages, show, live=None, interval: float = 0.5, *, startup: Path | None = None,
                 on_startup: Callable[[dict], None] | None = None) -> None:
        self.log, self.messages, self.show, self.live, self.interval = log, messages, show, live, interval
        self.startup, self.on_startup = startup, on_startup  # rank 0's start-up marks, handed over once they are written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from pipelines.train.metrics import progress_line

        while True:
            stopping = self._stop.is_set()
            if self.startup is not None and self.startup.exists():  # written whole (atomically), at the first step
                marks, self.startup = json.loads(self.startup.read_text()), None
                self.on_startup(marks)
            for record in self.messages.new_records():
                self.show(record["message"])
            for record in self.log.new_records():
                if self.live is None or "val/loss" in record:
                    self.show(progress_line(record))
                else:
                    self.live(step_bar(record))
            if stopping:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.live is not None:
            self.live(None)  # the last progress line stays on screen
