"""Ray Jobs: relaygpt submit / jobs against the session's `ray start --head` on 127.0.0.1."""

import re
import time
from pathlib import Path

import pytest

from distributed import free_port
from helpers import relaygpt

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _job_file(tmp_path, steps, out=None):
    text = (REPO / "jobs" / "tiny-assistant.yaml").read_text()
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path, ["--set", f"stages.pretrain.steps={steps}", "--set", "stages.pretrain.optimizer.warmup_steps=0",
                  "--set", "stages.pretrain.log_every=1", "--set", "stages.sft=null",
                  "--set", "stages.eval=null", "--set", "data.synthetic.mentions_per_fact=6", "--set", "data.num_proc=1",
                  "--out", str(out or tmp_path / "out")]


def _wait_for(head, job_id, states, timeout=300):
    deadline, state = time.time() + timeout, None
    while time.time() < deadline:
        state = relaygpt("jobs", "status", job_id, "--address", head.dashboard, env=head.env).stdout.strip()
        if state in states:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not reach {states} (last: {state})")


def test_submit_runs_a_short_job_to_success(ray_head, tmp_path):
    """With an output directory that has spaces and a `; touch` in its name: Ray runs the
    entrypoint through a shell, which must pass it as one argument and run nothing else."""
    pwned = tmp_path / "PWNED"
    out_dir = tmp_path / f"o u t; touch {pwned}"
    job, extra = _job_file(tmp_path, steps=4, out=out_dir)
    proc = relaygpt("submit", job, "--address", ray_head.dashboard, *extra, env=ray_head.env)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted tiny-assistant as (\S+)", proc.stdout).group(1)
    assert "relaygpt jobs logs" in proc.stdout
    logs = lambda: relaygpt("jobs", "logs", job_id, "--address", ray_head.dashboard, env=ray_head.env)  # noqa: E731
    assert _wait_for(ray_head, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", logs().stdout[-3000:]
    out = logs()
    assert out.returncode == 0 and "[pretrain] step 4/4" in out.stdout and "done: tiny-assistant" in out.stdout
    listed = relaygpt("jobs", "list", "--address", ray_head.dashboard, env=ray_head.env)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert (out_dir / "tiny-assistant" / "default" / "pretrain" / "model" / "model.safetensors").exists()
    assert not pwned.exists()


def test_stop_stops_a_long_job(ray_head, tmp_path):
    job, extra = _job_file(tmp_path, steps=100000)
    proc = relaygpt("submit", job, "--address", ray_head.dashboard, *extra, env=ray_head.env)
    job_id = re.search(r"submitted tiny-assistant as (\S+)", proc.stdout).group(1)
    metrics = tmp_path / "out" / "tiny-assistant" / "default" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(1)
    assert metrics.exists(), relaygpt("jobs", "logs", job_id, "--address", ray_head.dashboard, env=ray_head.env).stdout[-3000:]
    stop = relaygpt("jobs", "stop", job_id, "--address", ray_head.dashboard, env=ray_head.env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    assert _wait_for(ray_head, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) == "STOPPED"


def test_unknown_job_id_wrong_token_and_unreachable_address_are_one_line_errors(ray_head):
    proc = relaygpt("jobs", "status", "raysubmit_nope", "--address", ray_head.dashboard, env=ray_head.env)
    assert proc.returncode == 2 and "raysubmit_nope" in proc.stderr and "\n" not in proc.stderr.strip()
    proc = relaygpt("jobs", "list", "--address", ray_head.dashboard, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"})
    assert proc.returncode == 2 and "refused the token" in proc.stderr and "\n" not in proc.stderr.strip()
    proc = relaygpt("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "cannot reach the Ray cluster" in proc.stderr and "Traceback" not in proc.stderr
