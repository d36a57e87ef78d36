"""The terminal during a run: relaygpt's lines and one live progress line; everything else
printed (by Python, native code or child processes) goes to the run's log."""

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from cluster.console import Console, bar, eta, step_bar

REPO = Path(__file__).resolve().parents[1]


class Screen(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_redraws_the_progress_line_and_keeps_lines_above_it():
    screen = Screen()
    console = Console(screen, width=80)
    console.progress("[pretrain] [##......] 1/4")
    console.progress("[pretrain] [####....] 2/4")
    console.line("[pretrain] step 2/4  val loss 1.0")  # a line that stays: written above the bar, which is redrawn
    console.progress(None)  # the stage is over: its last bar stays
    console.line("[sft] next")
    text = screen.getvalue()
    assert text.startswith("\r[pretrain] [##......] 1/4\r[pretrain] [####....] 2/4")
    rows = text.replace("\r", "\n").split("\n")
    visible = [r.strip() for r in rows if r.strip()]
    assert visible[-3:] == ["[pretrain] step 2/4  val loss 1.0", "[pretrain] [####....] 2/4", "[sft] next"]
    assert text.endswith("[pretrain] [####....] 2/4\n[sft] next\n")


def test_a_terminal_that_reports_no_size_does_not_cut_the_line():
    import os
    import pty

    master, slave = pty.openpty()  # a fresh pseudo-terminal says it is 0 columns wide
    try:
        with os.fdopen(os.dup(slave), "w") as stream:
            console = Console(stream)
            assert console.live and console.width == 120
    finally:
        os.close(master)
        os.close(slave)


def test_anywhere_else_every_update_is_a_line():
    out = io.StringIO()
    console = Console(out)
    assert not console.live
    console.progress("a")
    console.progress("b")
    console.progress(None)
    console.line("c")
    assert out.getvalue() == "a\nb\nc\n"


def test_a_shorter_update_leaves_nothing_of_the_longer_one():
    screen = Screen()
    console = Console(screen, width=80)
    console.progress("x" * 20)
    console.progress("y" * 5)
    # after the carriage return: 5 new characters, 15 blanks over the old ones, the cursor back after the 5
    assert screen.getvalue().endswith("\r" + "y" * 5 + " " * 15 + "\b" * 15)


def test_bars_and_times():
    assert bar(0, 4, width=8) == "[........]" and bar(2, 4, width=8) == "[####....]" and bar(4, 4, width=8) == "[########]"
    assert eta(None) == "?" and eta(42.4) == "42s" and eta(125) == "2m05s"
    line = step_bar({"stage": "sft", "step": 30, "total_steps": 150, "train/loss": 1.23456, "perf/tokens_per_s": 15800.0, "eta_s": 16})
    assert line == "[sft] [#####...................] 30/150  loss 1.2346  15.8k tok/s  eta 16s"


def test_output_to_takes_python_native_and_child_output_to_the_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys
        from pathlib import Path
        from cluster.console import output_to, terminal

        console = terminal()
        with output_to(Path({str(log)!r})):
            console.line("[run] mine")
            print("python print")
            logging.getLogger("ray").warning("a library's warning")
            os.write(2, b"native stderr\\n")
            subprocess.run(["echo", "a child process"], check=True)
        print("after the block")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[run] mine\nafter the block\n" and proc.stderr == ""
    text = log.read_text()
    for line in ("python print", "a library's warning", "native stderr", "a child process"):
        assert line in text, text


def test_output_to_restores_the_terminal_after_an_error_inside(tmp_path):
    log = tmp_path / "run.log"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from cluster.console import output_to

        try:
            with output_to(Path({str(log)!r})):
                print("inside")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        print("after the error")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "after the error\n", proc.stdout + proc.stderr
    assert "inside" in log.read_text()


def test_a_failed_stage_is_named_by_its_cause_not_by_a_lost_connection_or_a_header(tmp_path):
    from cluster.driver import _failure
    from cluster.failures import WorkerFailed, first_worker_failure
    from pipelines.rundir import RunDir

    class WorkerGroupError(Exception):  # the shape of Ray Train's: one exception per failed rank
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:")
            self.worker_failures = failures

    knock_on = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    cause = IndexError("index out of range in self")
    assert first_worker_failure(WorkerGroupError({0: knock_on, 1: cause})) == (
        "rank 1: IndexError: index out of range in self (and 1 other rank(s); all in the log)")
    assert first_worker_failure(WorkerGroupError({3: cause})) == "rank 3: IndexError: index out of range in self"
    assert first_worker_failure(RuntimeError("no ranks")) is None
    run_dir = RunDir(tmp_path / "run")
    failed = _failure(run_dir, "pretrain", RuntimeError("Training failed due to a controller error:\nthe placement group was removed"))
    assert str(failed) == "pretrain failed: RuntimeError: the placement group was removed" and failed.log == str(run_dir.log_file)
    assert "Traceback" in run_dir.log_file.read_text() or "RuntimeError" in run_dir.log_file.read_text()
    assert str(_failure(run_dir, "sft", WorkerFailed("rank 0: IndexError: x"))) == "sft failed: rank 0: IndexError: x"


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """`relaygpt run ... | head -8`: once the pipe is closed, relaygpt's lines (the progress
    thread's too) go nowhere, without an error, and the process exits as it would have."""
    script = textwrap.dedent("""
        import threading
        from cluster.console import terminal
        console = terminal()
        lines = lambda: [console.line("x" * 200) for _ in range(20000)]
        thread = threading.Thread(target=lines)
        thread.start()
        thread.join()
        console.progress("a progress update")
        console.done()
        console.line("the summary")
        print("closed" if console.closed else "open", file=__import__("sys").stderr)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout.readline().startswith(b"xxx")
    proc.stdout.close()  # as head does after its lines
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err.decode().strip() == "closed", err.decode()
