"""The start-up of `relaygpt run` and the local launcher (issue 19, item 10).

A one-worker job on an embedded run (no --address) trains in a child process of the driver,
without Ray: each run here is a `relaygpt run` process as a user starts it, on a small job
(2 layers x 64, a 512-id BPE trained on 60 KB of tinyshakespeare), asserting on what it wrote. The
start-up record is checked for its shape and arithmetic, never for how long anything took.
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

from helpers import assert_one_line_error, relaygpt

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _job(tmp_path, shakespeare, **stage) -> Path:
    (tmp_path / "corpus.txt").write_text(shakespeare[:60_000])
    job = {"name": "local", "seed": 5, "output_dir": "runs",
           "model": {"preset": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 64},
           "tokenizer": {"train": {"vocab_size": 512}},
           "data": {"num_proc": 1, "pretrain": {"val_fraction": 0.1, "sources": [
               {"type": "text", "path": "corpus.txt", "split_by": "blank_line"}]}},
           "cluster": {"num_workers": 1, "cpus_per_worker": 1},
           "stages": {"pretrain": {"steps": STEPS, "micro_batch": 4, "log_every": 1, "eval_every": 4, "checkpoint_every": 4,
                                   "deepspeed": {"zero_stage": 0}, **stage}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _run_dir(tmp_path) -> Path:
    return tmp_path / "runs" / "local" / "default"


def _start(*args, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "RAY_ADDRESS": ""})


def _steps(run: Path) -> list[int]:
    metrics = run / "pretrain" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- unit: the launcher choice and the start-up arithmetic -----------------------------------

@pytest.mark.parametrize("launcher, workers, joins, expected", [
    ("auto", 1, False, "local"), ("auto", 2, False, "ray"), ("auto", 1, True, "ray"),
    ("ray", 1, False, "ray"), ("local", 1, False, "local"), ("local", 3, False, "local"),
])
def test_the_launcher_a_job_gets(launcher, workers, joins, expected):
    from cluster.launch import choose_launcher
    from jobs.cluster import ClusterSpec

    assert choose_launcher(ClusterSpec(launcher=launcher, num_workers=workers), joins_a_cluster=joins) == expected


def test_a_local_launcher_that_would_join_a_cluster_is_refused_in_one_line(tmp_path, shakespeare, capsys):
    from cluster import cli
    from cluster.launch import choose_launcher
    from jobs.cluster import ClusterSpec
    from model.errors import RelayError

    with pytest.raises(RelayError, match="cluster.launcher: local starts the training workers on this machine"):
        choose_launcher(ClusterSpec(launcher="local"), joins_a_cluster=True)
    path = _job(tmp_path, shakespeare)
    for setting, needle in (("cluster.launcher=local", None), ("cluster.launcher=fast", "Input should be 'auto', 'ray' or 'local'")):
        extra = ["--set", "cluster.address=127.0.0.1:1"] if needle is None else []
        code = cli.main(["plan", str(path), "--set", setting, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "cluster.launcher: " in err, err
        assert (needle or "cluster.address names a Ray cluster") in err, err


def test_start_up_phases_are_exclusive_and_add_up_to_the_total():
    from cluster.startup import StartupClock

    clock = StartupClock(started_at=100.0)
    with clock.phase("data"):
        with clock.phase("ray_start"):
            time.sleep(0.02)
        time.sleep(0.01)
    assert clock.seconds["ray_start"] >= 0.02 and 0.01 <= clock.seconds["data"] < 0.02  # the data phase less Ray's start
    assert clock.launching("pretrain", "local") and not clock.launching("sft", "local")  # the first training stage is measured
    clock.launched_at = 110.0
    clock.worker_marks({"distributed": 111.0, "built": 112.5, "resumed": 112.75, "first_step": 113.0})
    phases = clock.phases()
    assert list(phases) == ["ray_start", "data", "worker_start", "engine_init", "resume", "first_step", "other"]
    assert (phases["worker_start"], phases["engine_init"], phases["resume"], phases["first_step"]) == (1.0, 1.5, 0.25, 0.25)
    assert clock.total() == 13.0 and sum(phases.values()) == pytest.approx(13.0)
    assert clock.stage_record() == {"launcher": "local", "to_first_step": 3.0,
                                    "seconds": {"worker_start": 1.0, "engine_init": 1.5, "resume": 0.25, "first_step": 0.25}}
    assert clock.line().endswith("= 13.0s to the first pretrain step (local launcher)")
    with clock.phase("ray_start"):  # the eval stage's Ray, after the first step: not start-up
        time.sleep(0.01)
    assert clock.phases() == phases


# ---- end to end: relaygpt run without --address ---------------------------------------------

@pytest.mark.slow
def test_a_one_worker_run_trains_in_a_local_process_and_records_its_start_up(tmp_path, shakespeare):
    """No Ray at all: the data in the driver, the worker a child of the driver; the start-up
    line and record. Its reader goes away after that line (`| head`): the run goes on quietly."""
    from model.export import load_model_dir

    run = _run_dir(tmp_path)
    job = _job(tmp_path, shakespeare)  # also tracked in MLflow (its file store in the run directory)
    job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "tracking": {"mlflow": {"experiment": "local-exp"}}}))
    proc = _start("run", job, "--out", tmp_path / "runs")
    seen = []
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if line.startswith("[run] start-up:"):
            break
    proc.stdout.close()  # as `| head` does: the steps and the summary go nowhere
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, "\n".join(seen) + err
    assert err == "", err
    assert "[data] tokenizer and token shards (1 worker(s), in this process)" in seen, seen
    summary = json.loads((run / "summary.json").read_text())
    startup = summary["startup"]
    assert startup["stage"] == "pretrain" and startup["launcher"] == "local", startup
    phases = startup["seconds"]
    assert list(phases) == ["tokenizer", "data", "worker_start", "engine_init", "resume", "first_step", "other"], phases
    assert all(phases[p] > 0 for p in ("tokenizer", "data", "worker_start", "engine_init", "first_step")), phases
    assert phases["resume"] >= 0 and phases["other"] >= 0
    assert sum(phases.values()) == pytest.approx(startup["total"], abs=0.01)
    assert f"= {startup['total']:.1f}s to the first pretrain step (local launcher)" in seen[-1], seen[-1]
    stage = json.loads((run / "pretrain" / "stage.json").read_text())
    assert stage["status"] == "completed" and stage["result"]["step"] == STEPS
    assert stage["result"]["startup"]["launcher"] == "local"
    assert stage["result"]["startup"]["seconds"]["first_step"] == phases["first_step"]
    where = json.loads((run / "pretrain" / "workers" / "rank_0.json").read_text())
    assert where["node_id"] == "local" and where["pid"] != proc.pid
    assert _steps(run) == list(range(1, STEPS + 1))
    model, tokenizer, meta = load_model_dir(run / "pretrain" / "model")
    assert meta["provenance"]["steps"] == STEPS and model.config.n_layer == 2
    assert "RayTrainWorker" not in (run / "logs" / "run.log").read_text()
    manifest = json.loads((run / "data" / "pretrain" / "manifest.json").read_text())
    assert manifest["workers"] == [{"node": "local", "blocks": 1}]
    _assert_mlflow_holds_the_scalars(run)


def _assert_mlflow_holds_the_scalars(run: Path) -> None:
    """MLflow's file store holds the stage's run: every TensorBoard scalar of metrics.jsonl at
    its step, and the resolved plan as parameters (read back with mlflow's own client)."""
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("local-exp")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "local/default/pretrain" and tracked.info.status == "FINISHED"
    assert tracked.data.tags["relaygpt.stage"] == "pretrain"
    assert json.loads((run / "pretrain" / "tracking.json").read_text())["mlflow_run_id"] == tracked.info.run_id
    params = tracked.data.params
    assert params["job.name"] == "local" and params["plan.micro_batch"] == "4" and params["plan.total_steps"] == str(STEPS)
    logged = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    for name in ("train/loss", "train/lr", "val/loss"):
        expected = [(m["step"], m[name]) for m in logged if name in m]
        history = sorted((h.step, h.value) for h in client.get_metric_history(tracked.info.run_id, name))
        assert expected and [s for s, _ in history] == [s for s, _ in expected], name
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6), name


@pytest.mark.slow
def test_a_user_error_in_the_worker_is_one_line_exit_2(tmp_path, shakespeare):
    """A shard cut short after preparation: the worker's check names it; the driver says that line."""
    path = _job(tmp_path, shakespeare)
    prepared = relaygpt("data", "prepare", path)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    shard = sorted((_run_dir(tmp_path) / "data" / "pretrain").glob("train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    proc = relaygpt("run", path, env={"RAY_ADDRESS": ""})
    assert_one_line_error(proc, f"{shard}:", "the manifest says")
    assert json.loads((_run_dir(tmp_path) / "pretrain" / "stage.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_a_failing_worker_is_restarted_max_failures_times_then_one_line_exit_1(tmp_path, shakespeare):
    """Token ids beyond the vocabulary fail every attempt: one restart (max_failures 1), then the
    stage's one line with the rank's error and the log, whose traceback is there."""
    path = _job(tmp_path, shakespeare)
    assert relaygpt("data", "prepare", path).returncode == 0
    run = _run_dir(tmp_path)
    for shard in (run / "data" / "pretrain").glob("train_*.bin"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    proc = relaygpt("run", path, "--set", "cluster.max_failures=1", env={"RAY_ADDRESS": ""})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = run / "logs" / "run.log"
    line = proc.stderr.strip()
    assert line == f"relaygpt: pretrain failed: rank 0: IndexError: index out of range in self (full log: {log})", line
    text = log.read_text()
    assert "[pretrain] worker failure 1 (rank 0: IndexError" in text and text.count("Traceback") >= 2, text[-3000:]
    assert json.loads((run / "pretrain" / "stage.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_a_killed_worker_is_started_again_and_resumes_from_its_newest_checkpoint(tmp_path, shakespeare):
    steps, every = 200, 20
    path = _job(tmp_path, shakespeare, steps=steps, checkpoint_every=every, eval_every=1000)
    run = _run_dir(tmp_path)
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            done = _steps(run)
            if done and done[-1] >= every + 10:
                killed.update(step=done[-1], pid=json.loads((run / "pretrain" / "workers" / "rank_0.json").read_text())["pid"])
                os.kill(killed["pid"], signal.SIGKILL)
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    proc = relaygpt("run", path, "--set", "cluster.max_failures=1", env={"RAY_ADDRESS": ""})
    thread.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert killed and killed["step"] < steps, "the worker was never killed"
    resumed = [int(line.rsplit(" ", 1)[1]) for line in proc.stdout.splitlines() if "] resumed from " in line]
    assert len(resumed) == 1, proc.stdout[-2000:]
    assert resumed[0] % every == 0 and resumed[0] >= every and abs(killed["step"] - resumed[0]) <= every + 5, (resumed, killed)
    assert _steps(run) == list(range(1, steps + 1)), "one history: each step once"
    assert json.loads((run / "pretrain" / "workers" / "rank_0.json").read_text())["pid"] != killed["pid"]
    assert "worker failure 1 (rank 0: killed by SIGKILL)" in (run / "logs" / "run.log").read_text()


@pytest.mark.slow
def test_sigterm_stops_the_driver_and_its_worker(tmp_path, shakespeare):
    path = _job(tmp_path, shakespeare, steps=100000, checkpoint_every=100000, eval_every=100000)
    run = _run_dir(tmp_path)
    proc = _start("run", path, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _steps(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert _steps(run), proc.stderr.read() if proc.poll() is not None else "no step in 300 s"
    worker = json.loads((run / "pretrain" / "workers" / "rank_0.json").read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and not _alive(worker)
    assert json.loads((run / "pretrain" / "stage.json").read_text())["status"] == "interrupted"
