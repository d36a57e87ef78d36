"""`relaygpt submit` and `relaygpt jobs`: running a job on a Ray cluster through Ray Jobs.

The submission carries the project's packages (runtime_env py_modules) and a resolved copy of
the job file (every default filled in, relative paths made absolute against the submitting
machine, so they must exist on the cluster too: a shared filesystem, as for checkpoints). The
cluster's Python environment provides the dependencies (torch, deepspeed, ray, ...).
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from cluster.own_code import PACKAGES
from cluster.own_code import ROOT as PROJECT
from model.errors import RelayError


def check_dashboard_address(address: str) -> None:
    """A dashboard address is http(s)://host:port; anything else is one line naming --address."""
    from jobs.cluster import parse_address

    try:
        parse_address(address, "--address", ("https", "http"))
    except ValueError as exc:
        raise RelayError(str(exc)) from None


def client(address: str):
    check_dashboard_address(address)
    from ray.job_submission import JobSubmissionClient

    from cluster.runtime import check_reachable

    check_reachable(address.replace("https://", "tcp://").replace("http://", "tcp://"), field="--address")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "uthentication" in type(exc).__name__ + first:
            raise RelayError(f"--address: the Ray cluster at {address} refused the token ({first[:100]}); set RAY_AUTH_MODE=token and "
                             "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token (ray get-auth-token on the head)") from None
        raise RelayError(f"--address: {address} does not answer as a Ray dashboard ({type(exc).__name__}: {first[:120]})") from None


def _absolute_paths(job) -> dict:
    """The resolved job with every path made absolute (the copy travels; relative paths would not)."""
    data = job.resolved_dict()
    data["output_dir"] = str(job.path(job.output_dir).resolve())
    for name in ("pretrain", "sft", "dpo"):
        section = data["data"].get(name)
        for source in (section or {}).get("sources", []):
            if source.get("path"):
                source["path"] = str(job.path(source["path"]).resolve())
        stage = data["stages"].get(name)
        if stage and stage.get("init"):
            stage["init"] = str(job.path(stage["init"]).resolve())
    for field in ("file", "dir"):
        if data["tokenizer"].get(field):
            data["tokenizer"][field] = str(job.path(data["tokenizer"][field]).resolve())
    if data["stages"].get("eval"):
        from pipelines.eval.task import TASK_DIR

        data["stages"]["eval"]["tasks"] = [t if t == "synthetic" or (TASK_DIR / f"{t}.yaml").exists()
                                           else str(job.path(t).resolve()) for t in data["stages"]["eval"]["tasks"]]
    return data


def entrypoint(run_id: str, out: str | None, resume: bool) -> str:
    """The command Ray Jobs runs on the cluster. Ray hands it to a shell, so every argument is
    quoted: a path with a space or a `;` stays one argument and never runs as a command."""
    argv = ["python", "-m", "cluster.cli", "run", "job.yaml", "--run-id", run_id]
    if out:
        argv += ["--out", str(Path(out).resolve())]
    if resume:
        argv.append("--resume")
    return shlex.join(argv)


def submit(job, address: str, *, run_dir, run_id: str = "default", out: str | None = None, resume: bool = False) -> str:
    """Submit `job` to the Ray cluster at `address` (http://host:8265); returns the job id.
    `run_dir` (a RunDir) is where the run will write, checked here before anything is sent."""
    from cluster.launch import choose_launcher
    from cluster.preflight import preflight

    preflight(job, run_dir)
    choose_launcher(job.cluster, joins_a_cluster=True)  # the run joins the cluster: a local launcher is refused here
    api = client(address)
    staging = Path(tempfile.mkdtemp(prefix="relaygpt-submit-"))
    try:
        (staging / "job.yaml").write_text(yaml.safe_dump(_absolute_paths(job), sort_keys=False))
        runtime_env = {
            "working_dir": str(staging),
            "py_modules": [str(PROJECT / p) for p in PACKAGES],
            "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"},
        }
        try:
            return api.submit_job(entrypoint=entrypoint(run_id, out, resume), runtime_env=runtime_env,
                                  metadata={"relaygpt_job": job.name}, submission_id=None)
        except Exception as exc:
            raise RelayError(f"the Ray cluster at {address} refused the submission ({type(exc).__name__}: {str(exc)[:200]})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_jobs(address: str) -> list[dict]:
    jobs = client(address).list_jobs()
    return [{"id": j.submission_id, "status": str(j.status.value if hasattr(j.status, "value") else j.status),
             "job": (j.metadata or {}).get("relaygpt_job", ""), "entrypoint": j.entrypoint, "start_time": j.start_time} for j in jobs]


def status(address: str, job_id: str) -> str:
    try:
        value = client(address).get_job_status(job_id)
    except Exception:
        raise RelayError(f"job {job_id!r} is not known to the cluster at {address} (relaygpt jobs list shows the ids)") from None
    return str(value.value if hasattr(value, "value") else value)


def logs(address: str, job_id: str) -> str:
    status(address, job_id)
    return client(address).get_job_logs(job_id)


def follow(address: str, job_id: str, write, poll: float = 1.0) -> str:
    """Stream a job's logs until it ends; returns the final status."""
    api = client(address)
    status(address, job_id)
    seen = 0
    while True:
        text = api.get_job_logs(job_id)
        if len(text) > seen:
            write(text[seen:])
            seen = len(text)
        state = status(address, job_id)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            text = api.get_job_logs(job_id)
            if len(text) > seen:
                write(text[seen:])
            return state
        time.sleep(poll)


def stop(address: str, job_id: str) -> bool:
    status(address, job_id)
    return bool(client(address).stop_job(job_id))
