"""Ray Jobs: relaygpt submit / jobs against a `ray start --head` subprocess on 127.0.0.1."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": __import__("secrets").token_hex(16)}  # the head's token, for this module only


def relaygpt(*args, timeout=300, auth=True):
    env = {**os.environ, **(AUTH if auth else {})}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head in its own process group (--block), torn down with it."""
    ports = {name: free_port() for name in ("port", "dashboard", "agent_listen", "agent_grpc", "metrics", "runtime_env", "client")}
    temp = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, **AUTH, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports["port"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]), "--include-dashboard", "true",
           "--dashboard-agent-listen-port", str(ports["agent_listen"]), "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
           "--metrics-export-port", str(ports["metrics"]), "--runtime-env-agent-port", str(ports["runtime_env"]),
           "--ray-client-server-port", str(ports["client"]), "--num-cpus", "3", "--temp-dir", str(temp), "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if relaygpt("jobs", "list", "--address", address, timeout=60).returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail("ray start exited: " + proc.stdout.read().decode()[-2000:])
        time.sleep(2)
    else:
        pytest.fail("the Ray head did not come up in 120 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _job_file(tmp_path, steps):
    text = (REPO / "jobs" / "tiny-assistant.yaml").read_text()
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path, ["--set", f"stages.pretrain.steps={steps}", "--set", "stages.pretrain.log_every=1", "--set", "stages.sft=null",
                  "--set", "stages.eval=null", "--set", "data.synthetic.mentions_per_fact=6", "--set", "data.num_proc=1",
                  "--out", str(tmp_path / "out")]


def _wait_for(address, job_id, states, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = relaygpt("jobs", "status", job_id, "--address", address).stdout.strip()
        if state in states:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not reach {states} (last: {state})")


def test_submit_runs_a_short_job_to_success(ray_head, tmp_path):
    job, extra = _job_file(tmp_path, steps=4)
    proc = relaygpt("submit", job, "--address", ray_head, *extra)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted tiny-assistant as (\S+)", proc.stdout).group(1)
    assert "relaygpt jobs logs" in proc.stdout
    assert _wait_for(ray_head, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", relaygpt("jobs", "logs", job_id, "--address", ray_head).stdout[-3000:]
    logs = relaygpt("jobs", "logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "[pretrain] step 4/4" in logs.stdout and "done: tiny-assistant" in logs.stdout
    listed = relaygpt("jobs", "list", "--address", ray_head)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert (tmp_path / "out" / "tiny-assistant" / "default" / "pretrain" / "model" / "model.safetensors").exists()


def test_stop_stops_a_long_job(ray_head, tmp_path):
    job, extra = _job_file(tmp_path, steps=100000)
    proc = relaygpt("submit", job, "--address", ray_head, *extra)
    job_id = re.search(r"submitted tiny-assistant as (\S+)", proc.stdout).group(1)
    metrics = tmp_path / "out" / "tiny-assistant" / "default" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(1)
    assert metrics.exists(), relaygpt("jobs", "logs", job_id, "--address", ray_head).stdout[-3000:]
    stop = relaygpt("jobs", "stop", job_id, "--address", ray_head)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    assert _wait_for(ray_head, job_id, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) == "STOPPED"


def test_unknown_job_id_wrong_token_and_unreachable_address_are_one_line_errors(ray_head):
    proc = relaygpt("jobs", "status", "raysubmit_nope", "--address", ray_head)
    assert proc.returncode == 2 and "raysubmit_nope" in proc.stderr and "\n" not in proc.stderr.strip()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "jobs", "list", "--address", ray_head], capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"})
    assert proc.returncode == 2 and "refused the token" in proc.stderr and "\n" not in proc.stderr.strip()
    proc = relaygpt("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "cannot reach the Ray cluster" in proc.stderr and "Traceback" not in proc.stderr
