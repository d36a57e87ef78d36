"""Stopping a command promptly: SIGINT and SIGTERM end it, and every process it started, within
STOP_DEADLINE_S, at any phase (Ray starting, data preparation, training), leaving a resumable run.

- Both signals raise KeyboardInterrupt in the main thread, so the way out is the ordinary one:
  the running stage records itself as interrupted, the local ranks are stopped, Ray is shut
  down, the run directory's lock is released (cluster/driver.py, cluster/local.py).
- The first signal also arms a deadline. Whatever still runs when it passes (a Ray shutdown that
  waits on a dead service, a rank that ignores SIGTERM) is killed, and the command exits 130.
  Later signals are not needed and are ignored: a second Ctrl-C must not cut the way out short.
- Nothing the command started outlives it. While it runs it is the subreaper of its process
  tree (Linux), so a process whose parent died (a Ray dashboard module whose dashboard went
  first) stays its descendant; on the way out every descendant still running gets SIGTERM, and
  SIGKILL after END_GRACE_S. Processes are named by (pid, start time), so a reused pid is never
  signalled.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress

STOP_DEADLINE_S = 7.0  # from the first signal to the exit, whatever the way out is doing
END_GRACE_S = 2.0  # SIGTERM to SIGKILL for processes left on the way out
EXIT_INTERRUPTED = 130
PR_SET_CHILD_SUBREAPER = 36


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int | None = None, *, besides: dict[int, int] | None = None) -> dict[int, int]:
    """{pid: start time} of every living process below `root` (default: this one), except the
    processes of `besides` and everything below them; {} where there is no /proc."""
    root = os.getpid() if root is None else root
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return {}
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in pids:
        stat = _stat(pid)
        if stat is not None and stat[2] not in ("Z", "X"):
            children.setdefault(stat[0], []).append((pid, stat[1]))
    found, frontier = {}, [root]
    while frontier:
        for pid, started in children.get(frontier.pop(), []):
            if pid not in found and (besides or {}).get(pid) != started:
                found[pid] = started
                frontier.append(pid)
    return found


def _alive(processes: dict[int, int]) -> dict[int, int]:
    alive = {}
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started and stat[2] not in ("Z", "X"):
            alive[pid] = started
    return alive


def _signal_all(processes: dict[int, int], signum: int) -> None:
    for pid in _alive(processes):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _reap(processes: dict[int, int]) -> None:
    """Collect the exit status of those of `processes` that are this process's children and
    have ended (orphans it adopted as subreaper: no one else waits for them), so that none
    stays a zombie."""
    me = os.getpid()
    for pid in processes:
        stat = _stat(pid)
        if stat is not None and stat[0] == me and stat[2] == "Z":
            with suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def end_all(processes: dict[int, int], grace: float = END_GRACE_S) -> None:
    """SIGTERM to each of `processes` still running, SIGKILL to those left after `grace`."""
    _signal_all(processes, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(processes) and time.monotonic() < deadline:
        _reap(processes)
        time.sleep(0.05)
    _signal_all(processes, signal.SIGKILL)
    time.sleep(0.05)
    _reap(processes)


def _subreaper(on: bool) -> bool:
    """Make this process the subreaper of its descendants (Linux); whether it is now one."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@contextmanager
def stopping(deadline: float = STOP_DEADLINE_S):
    """Inside the block: SIGINT and SIGTERM stop the command within `deadline` seconds, and on
    the way out (however it goes) every process it started is ended. Only in the main thread;
    elsewhere the block runs as it is. Processes that were already running when the block began
    (a caller's own, as in a test that calls the CLI in its process) are left alone, with all
    they start."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signalled = threading.Event()
    theirs = descendants()

    def on_signal(signum, frame):
        if signalled.is_set():
            return  # the way out is under way, bounded by the deadline
        signalled.set()
        timer = threading.Timer(deadline, _out_of_time, args=(signal.Signals(signum).name, theirs))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    reaper = _subreaper(True)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        try:
            end_all(descendants(besides=theirs))
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if reaper:
                _subreaper(False)


def _out_of_time(name: str, theirs: dict[int, int]) -> None:
    """The deadline after a signal has passed: kill what is left, and exit at once."""
    _signal_all(descendants(besides=theirs), signal.SIGKILL)
    with suppress(OSError):
        os.write(2, f"relaygpt: stopped by {name}; killed what was still running after {STOP_DEADLINE_S:.0f} s\n".encode())
    os._exit(EXIT_INTERRUPTED)
