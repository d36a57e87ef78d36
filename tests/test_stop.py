"""Prompt stop (issue 20, item 6): SIGINT ends `relaygpt run` and every process it started
(the embedded Ray's services and workers, the local training rank) within 10 s at any phase,
and `relaygpt run --resume` then continues to the end.

One run directory goes through every phase: a run is interrupted while Ray starts, its resume
while the data is prepared on Ray Data, the next resume while training (after a checkpoint),
the next by SIGTERM while training, and the last resume completes. The job: 2 data workers (Ray Data on an embedded Ray), one
training worker (the local launcher: a child process of the driver in a session of its own).
The signal goes to the driver alone, as `kill -INT PID` does: nothing else of the run hears it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

STEPS, CHECKPOINT_EVERY = 200, 10
STOP_BOUND_S = 10.0  # the bound, from the signal to the last process of the run gone


def _stat(pid: int):
    """(name, state, session, start time) of a process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return text[text.index("(") + 1:text.rindex(")")], fields[0], int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Run:
    """`relaygpt run` in a session of its own, every process below it recorded as it appears
    ((pid, start time): a pid the system reuses later is not mistaken for one of the run's)."""

    def __init__(self, job: Path, out: Path, *extra: str) -> None:
        self.log = open(out.parent / f"stdout-{time.monotonic_ns()}.txt", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "run", str(job), "--out", str(out), *extra],
                                     stdout=self.log, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "RAY_ADDRESS": ""})
        self.seen: dict[tuple[int, int], str] = {}
        self.titles: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._done.is_set():
            self._record()
            time.sleep(0.05)

    def _record(self) -> None:
        parents: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                parents.setdefault(ppid, []).append(int(name))
        frontier = [self.proc.pid]
        while frontier:
            for pid in parents.get(frontier.pop(), []):
                stat = _stat(pid)
                if stat is not None:
                    title = _cmdline(pid) or stat[0]  # a Ray worker retitles itself with the task it runs
                    self.seen[(pid, stat[3])] = title
                    self.titles.add(title)
                frontier.append(pid)

    def names(self) -> set[str]:
        return self.titles

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"never {what}; exit {self.proc.poll()}: {self.output()[-2000:]} {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.02)

    def left(self) -> list[str]:
        """The run's processes still running: those recorded, and any left in its session."""
        alive = [f"{pid} {cmd[:80]}" for (pid, start), cmd in self.seen.items()
                 if (s := _stat(pid)) is not None and s[3] == start and s[1] != "Z"]
        in_session = [f"{int(p)} {_cmdline(int(p))[:80]}" for p in os.listdir("/proc")
                      if p.isdigit() and int(p) != self.proc.pid and (s := _stat(int(p))) is not None and s[2] == self.proc.pid and s[1] != "Z"]
        return sorted(set(alive + in_session))

    def interrupt(self, signum: int = signal.SIGINT) -> float:
        """`signum` to the driver; the seconds until it and every process of the run are gone."""
        self._record()
        start = time.monotonic()
        self.proc.send_signal(signum)
        while time.monotonic() - start < 60:
            if self.proc.poll() is not None and not self.left():
                break
            time.sleep(0.05)
        self.stop()
        return time.monotonic() - start

    def stop(self) -> None:
        self._done.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for key in self.seen:  # whatever a failed assertion left running
            if (s := _stat(key[0])) is not None and s[3] == key[1]:
                try:
                    os.kill(key[0], signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def _job(tmp_path: Path, shakespeare: str) -> Path:
    (tmp_path / "corpus.txt").write_text(shakespeare[:60_000])
    job = {"name": "stop", "seed": 11,
           "model": {"preset": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 64},
           "tokenizer": {"train": {"vocab_size": 512}},
           "data": {"num_proc": 2, "pretrain": {"val_fraction": 0.1, "sources": [
               {"type": "text", "path": "corpus.txt", "split_by": "blank_line"}]}},
           "cluster": {"num_workers": 1, "cpus_per_worker": 1},
           "stages": {"pretrain": {"steps": STEPS, "micro_batch": 4, "log_every": 1, "eval_every": 100000,
                                   "checkpoint_every": CHECKPOINT_EVERY, "deepspeed": {"zero_stage": 0}}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _status(run: Path, stage: str) -> str | None:
    path = run / stage / "stage.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def _steps(run: Path) -> list[int]:
    path = run / "pretrain" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _ray_starting(run: Run) -> bool:
    return any("gcs_server" in name for name in list(run.names()))


def _preparing_on_ray(run: Run) -> bool:
    return any("_run_block" in name or "MapBatches" in name for name in list(run.names()))


@pytest.mark.slow
def test_sigint_at_any_phase_ends_the_whole_run_in_seconds_and_resume_completes(tmp_path, shakespeare):
    """Measured on 2 shared cores (2026-12-05), two runs: the stops took 0.6-1.0 s (Ray start),
    2.3-3.7 s (data on Ray Data), 2.7-3.7 s (training, SIGINT), 1.0 s (training, SIGTERM); the
    whole test 41-64 s. The bound asserted is the issue's 10 s."""
    job = _job(tmp_path, shakespeare)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file in --out\n")
    run_dir = out / "stop" / "default"
    phases = [
        ("while Ray starts", [], _ray_starting, "data", signal.SIGINT),
        ("while the data is prepared on Ray Data", ["--resume"], _preparing_on_ray, "data", signal.SIGINT),
        ("while training, after a checkpoint", ["--resume"], lambda r: len(_steps(run_dir)) > CHECKPOINT_EVERY + 3, "pretrain",
         signal.SIGINT),
        ("by SIGTERM, while training again", ["--resume"], lambda r: r.output().count("[pretrain] step ") >= 3, "pretrain",
         signal.SIGTERM),
    ]
    took = {}
    for what, extra, condition, stage, signum in phases:
        run = Run(job, out, *extra)
        try:
            run.wait_for(condition, f"reached the moment {what}")
            took[what] = run.interrupt(signum)
            left = run.left()
        finally:
            run.stop()
        err = run.proc.stderr.read()
        assert run.proc.returncode == 130 and "relaygpt: interrupted" in err, (what, run.proc.returncode, err[-2000:])
        assert not left, f"{what}: still running after {took[what]:.1f} s: {left}"
        assert took[what] < STOP_BOUND_S, f"{what}: the run took {took[what]:.1f} s to stop"
        assert _status(run_dir, stage) == "interrupted", (what, _status(run_dir, stage))
        if stage == "data":
            assert not (run_dir / "data" / "pretrain" / "manifest.json").exists(), f"{what}: the data was complete already"
    interrupted_at = _steps(run_dir)[-1]
    assert interrupted_at < STEPS
    final = Run(job, out, "--resume")
    try:
        assert final.proc.wait(timeout=600) == 0, final.output()[-3000:] + final.proc.stderr.read()[-3000:]
    finally:
        final.stop()
    text = final.output()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "] resumed from " in line]
    assert resumed and resumed[0] >= CHECKPOINT_EVERY and resumed[0] % CHECKPOINT_EVERY == 0, text[-2000:]
    assert _steps(run_dir) == list(range(1, STEPS + 1)), "one history: each step once"
    assert _status(run_dir, "pretrain") == "completed" and (run_dir / "pretrain" / "model" / "model.safetensors").exists()
    assert (out / "notes.txt").read_text() == "a user's file in --out\n"
    print({what: round(seconds, 1) for what, seconds in took.items()})


HANGING_WAY_OUT = """
import subprocess, sys, time
from cluster.stopping import stopping

with stopping(deadline=2.0):
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('ignoring', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    stubborn.stdout.readline()
    orphan = subprocess.run(["/bin/sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True).stdout.strip()
    print(stubborn.pid, orphan, flush=True)
    try:
        time.sleep(600)
    finally:
        time.sleep(600)  # a way out that hangs, as a Ray shutdown waiting on a service that is gone
"""


def test_a_way_out_that_hangs_is_cut_at_the_deadline_and_nothing_survives(tmp_path):
    """cluster/stopping.py alone: a child in a session of its own that ignores SIGTERM, an orphan
    (its parent exited: the command is its subreaper) and a `finally` that hangs. SIGINT, then a
    second one (ignored: the way out goes on): the command exits 130 at its 2 s deadline and
    neither process is left. Measured: 2.3 s from the first signal to the exit (the test 2.3 s)."""
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WAY_OUT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids: list[int] = []
    try:
        pids += [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_stat(p) for p in pids), (pids, proc.stderr.read() if proc.poll() is not None else "")
        started = {p: _stat(p)[3] for p in pids}
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        took = time.monotonic() - start
        assert 2.0 <= took < STOP_BOUND_S, took
        assert "stopped by SIGINT; killed what was still running" in proc.stderr.read()
        time.sleep(0.2)
        left = [p for p in pids if (s := _stat(p)) is not None and s[3] == started[p] and s[1] != "Z"]
        assert not left, left
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            if _stat(p) is not None:
                os.kill(p, signal.SIGKILL)
