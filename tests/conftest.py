"""Shared fixtures: offline environment, the shared data folder, small models and tokenizers.

The environment is fixed at import time so every process a test starts (DeepSpeed ranks,
CLI subprocesses, Ray workers) inherits it: CPU accelerator for DeepSpeed, no hub access, and
a tiktoken cache built from ../shared/data/tiktoken (see tests/tiktoken_cache.py).
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RELAYGPT_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(REPO / "tests"))

from tiktoken_cache import build_tiktoken_cache  # noqa: E402

_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="relaygpt-tests-"))
atexit.register(shutil.rmtree, _CACHE_ROOT, True)
os.environ["TIKTOKEN_CACHE_DIR"] = str(build_tiktoken_cache(SHARED_DATA / "tiktoken", _CACHE_ROOT / "tiktoken"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray in the tests stays on 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# This interpreter's bin directory first, for every process the tests start: DeepSpeed ranks
# JIT-build a comm op with the ninja on PATH, and alternating between two ninjas rebuilds it.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare(shared_data) -> str:
    return (shared_data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from model.tokenizer import Tokenizer

    return Tokenizer.from_name("gpt2")


@pytest.fixture(scope="session")
def llama3_style_tokenizer(tmp_path_factory, shakespeare):
    """A hub tokenizer directory in Llama 3's form with its chat template (helpers.llama3_style_tokenizer_dir)."""
    from helpers import llama3_style_tokenizer_dir

    return llama3_style_tokenizer_dir(tmp_path_factory.mktemp("llama3-tokenizer"), shakespeare[:200_000])


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, shakespeare):
    """A 1024-token BPE trained on tinyshakespeare and saved (so it pickles by path)."""
    from model.tokenizer import Tokenizer

    tok = Tokenizer.train([shakespeare[:300_000]], 1024, name="shakespeare-1k")
    tok.save(tmp_path_factory.mktemp("tok") / "shakespeare-1k")
    return tok


@pytest.fixture(scope="session")
def engine_job(tmp_path_factory):
    """(job file, prepared template run, root) of the tiny training job every engine and layout
    test trains: the tokenizer and data are prepared once per session and copied from there."""
    from jobs.plan import data_plan
    from jobs.spec import load_job
    from pipelines.data.prepare import prepare_data
    from train_helpers import write_base_job

    root = tmp_path_factory.mktemp("engine")
    job_path = write_base_job(root)
    prepare_data(data_plan(load_job(job_path)), root / "template")
    return job_path, root / "template", root


@dataclass(frozen=True)
class RayHead:
    """A running `ray start --head` on 127.0.0.1: the address drivers join, the dashboard URL
    Ray Jobs talks to, and the environment (its auth token) a client needs."""

    address: str
    dashboard: str
    env: dict


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One Ray cluster for the whole test session: a `ray start --head --block` process group
    on loopback, with its own auth token, stopped (SIGTERM, then SIGKILL) at the end.

    Tests drive it the way users do: each `relaygpt` command is its own short-lived driver
    joining with --address (or submitting through the dashboard). The pytest process itself
    never becomes a Ray driver, so nothing a test does in-process (forking tokenizer workers,
    spawning DeepSpeed ranks) can disturb a driver's connections to the cluster.
    """
    from distributed import free_port

    bin_dir = Path(sys.executable).parent
    ports = {name: free_port() for name in ("port", "dashboard", "agent_listen", "agent_grpc", "metrics", "runtime_env", "client")}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, **auth, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports["port"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]), "--include-dashboard", "true",
           "--dashboard-agent-listen-port", str(ports["agent_listen"]), "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
           "--metrics-export-port", str(ports["metrics"]), "--runtime-env-agent-port", str(ports["runtime_env"]),
           "--ray-client-server-port", str(ports["client"]),
           # Logical CPUs: headroom so a test never waits on CPUs a previous test's workers still release.
           "--num-cpus", "8", "--temp-dir", str(tmp_path_factory.mktemp("rayhead")), "--disable-usage-stats"]
    log = open(tmp_path_factory.mktemp("rayhead-log") / "head.log", "w+b")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(address=f"127.0.0.1:{ports['port']}", dashboard=f"http://127.0.0.1:{ports['dashboard']}", env=auth)
    try:
        _wait_for_head(head, proc, log)
        yield head
    finally:
        _stop_process_group(proc)
        log.close()


def _wait_for_head(head: RayHead, proc: subprocess.Popen, log, timeout: float = 120) -> None:
    """Until Ray Jobs answers on the dashboard (the last service a head brings up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        check = subprocess.run([sys.executable, "-m", "cluster.cli", "jobs", "list", "--address", head.dashboard],
                               capture_output=True, text=True, timeout=60, env={**os.environ, **head.env})
        if check.returncode == 0:
            return
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail("ray start exited: " + log.read().decode(errors="replace")[-2000:])
        time.sleep(2)
    pytest.fail(f"the Ray head did not come up in {timeout:.0f} s")


def _stop_process_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the head's process group (ray start stops its services), then SIGKILL to
    whatever of the group is left: GCS, raylet, dashboard and workers all belong to it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()

