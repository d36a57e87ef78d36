"""Training workers as child processes of the driver, without Ray (`cluster.launcher: local`,
and `auto` for one worker on an embedded run).

Each rank runs `cluster.local` (as `python -m` would, without the current folder on its path:
cluster/own_code.py) with the environment torchrun would give it (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free port), in a process group of its own.
It reads the driver's resolved plan from its stdin, runs the same worker function Ray Train
runs (train_stage, console off: the driver follows metrics.jsonl and messages.jsonl), prints
to the descriptors it inherits (the run's log) and reports how it ended on a pipe of its own:
a user error as its message, anything else as its first line (the traceback goes to the log).

What Ray Train's FailureConfig does, done here: a failed attempt stops every rank, and the
stage starts again from its newest checkpoint, up to `cluster.max_failures` times (-1: always).
An interrupt (Ctrl-C, SIGTERM) stops the ranks' process groups before the driver goes, and a
rank dies with the driver however the driver dies (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from model.errors import RelayError

REPORT_FD = "RELAYGPT_REPORT_FD"  # the descriptor a rank reports its end on
DRIVER_PID = "RELAYGPT_DRIVER_PID"
POLL_S = 0.2
STOP_GRACE_S = 10.0


@dataclass
class LocalRank:
    """One running rank: its process and the read end of its report pipe."""

    rank: int
    process: subprocess.Popen
    report: int
    stopped: bool = False  # stopped by the driver (a peer failed, an interrupt), not failed on its own


def train_locally(run, stage: str, cluster) -> None:
    """Train `stage` of the resolved run `run` on `cluster.num_workers` local processes; after
    a failure start them all again (they resume from the newest checkpoint), at most
    `cluster.max_failures` times. Raises RelayError for a rank's user error, WorkerFailed otherwise."""
    from cluster.failures import WorkerFailed

    failures = 0
    with _sigterm_as_interrupt():
        while True:
            failure = _attempt(run, stage, cluster)
            if failure is None:
                return
            failures += 1
            if cluster.max_failures != -1 and failures > cluster.max_failures:
                raise WorkerFailed(failure)
            print(f"[{stage}] worker failure {failures} ({failure}); starting the workers again from the newest checkpoint",
                  flush=True)  # to the run's log, as Ray Train's own line would be


def _attempt(run, stage: str, cluster) -> str | None:
    """One start of every rank, until they have all finished or one has failed: None when all
    succeeded, else `rank N: what failed`."""
    from cluster.failures import name_the_cause
    from pipelines.train.distributed import free_port

    port, ranks = free_port(), []
    try:
        for rank in range(cluster.num_workers):
            ranks.append(_start_rank(run, stage, cluster, rank, port))
        _wait(ranks)
    finally:
        _stop(ranks)
    ends = {r.rank: _read_report(r) for r in ranks}
    user_error = next((end["relay_error"] for end in ends.values() if "relay_error" in end), None)
    if user_error is not None:
        raise RelayError(user_error)
    failed = {r.rank: _describe_end(r, ends[r.rank]) for r in ranks if r.process.returncode != 0 and not r.stopped}
    return name_the_cause(failed) if failed else None


def _start_rank(run, stage: str, cluster, rank: int, port: int) -> LocalRank:
    from cluster.launch import worker_env
    from cluster.own_code import module_argv

    use_gpu = run.stage(stage).device == "cuda"
    read, write = os.pipe()
    env = {**os.environ, **worker_env(use_gpu), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": str(rank), "WORLD_SIZE": str(cluster.num_workers), "LOCAL_WORLD_SIZE": str(cluster.num_workers),
           REPORT_FD: str(write), DRIVER_PID: str(os.getpid())}
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cluster.cpus_per_worker))))  # as Ray gives a worker of that many CPUs
    if not use_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker sees no GPU (it would pick NCCL), as under Ray
    try:
        # Not `python -m`: that would put the current folder, and whatever packages it holds, first on the rank's path.
        process = subprocess.Popen(module_argv("cluster.local"), stdin=subprocess.PIPE, env=env, pass_fds=(write,),
                                   start_new_session=True)
    finally:
        os.close(write)  # the rank holds the only write end: its exit ends the report
    os.set_blocking(read, False)
    started = LocalRank(rank, process, read)
    try:
        process.stdin.write(pickle.dumps((run, stage)))
        process.stdin.close()
    except BrokenPipeError:  # the rank died before reading its plan; its exit status says so
        pass
    return started


def _wait(ranks: list[LocalRank]) -> None:
    """Until every rank has exited, or one has failed (the others would wait for it forever)."""
    while True:
        codes = [r.process.poll() for r in ranks]
        if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
            return
        time.sleep(POLL_S)


def _stop(ranks: list[LocalRank]) -> None:
    """SIGTERM to the process group of every rank still running, SIGKILL to what is left after
    STOP_GRACE_S; every rank is reaped."""
    running = [r for r in ranks if r.process.poll() is None]
    for r in running:
        r.stopped = True
        with suppress(ProcessLookupError):
            os.killpg(r.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for r in running:
        try:
            r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(r.process.pid, signal.SIGKILL)
            r.process.wait()


def _read_report(rank: LocalRank) -> dict:
    """What the rank reported before it exited ({} when it did not get to say)."""
    chunks = []
    try:
        while chunk := os.read(rank.report, 65536):
            chunks.append(chunk)
    except BlockingIOError:  # a process the rank forked still holds the pipe; the report came before the exit
        pass
    finally:
        os.close(rank.report)
    try:
        return json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}


def _describe_end(rank: LocalRank, end: dict) -> str:
    if "error" in end:
        return end["error"]
    code = rank.process.returncode
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


@contextmanager
def _sigterm_as_interrupt():
    """In the main thread, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so that the ranks
    are stopped on the way out (Python's default ends the driver on the spot)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # a thread, or a command that handles SIGTERM itself (cluster/stopping.py)
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the rank's side ------------------------------------------------------------------------

def main() -> int:
    """One local rank: its plan from stdin; its output to the run's log; how it ended to the driver."""
    _end_with_the_driver()
    report = int(os.environ[REPORT_FD])
    run, stage = pickle.load(sys.stdin.buffer)
    from cluster.failures import describe_error
    from cluster.launch import record_where
    from pipelines.train.entry import train_stage

    try:
        record_where(run.run_dir.stage(stage), int(os.environ["RANK"]), "local")
        train_stage(run, stage, console=False)
        return 0
    except RelayError as exc:
        os.write(report, json.dumps({"relay_error": str(exc)}).encode())
        return 2
    except BaseException as exc:
        import traceback

        traceback.print_exc()  # the whole story, in the run's log
        os.write(report, json.dumps({"error": describe_error(exc)}).encode())
        return 1


def _end_with_the_driver() -> None:
    """Have the kernel kill this process when the driver dies, however it dies (Linux only)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(os.environ[DRIVER_PID]):  # the driver was gone before the line above
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
