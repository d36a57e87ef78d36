"""Only relaygpt's own code runs: folders named like relaygpt's packages, in the folder a command
runs in or beside the job file, are never imported by the driver, a local rank or a Ray worker
(cluster/own_code.py).

Every planted module appends its name to a marker file and fails its import; the commands are
`relaygpt` processes as a user starts them, joining the session's Ray head so that data
preparation (Ray Data tasks), training (Ray Train), evaluation and generation (actor pools) all
run on Ray workers, whose path Ray starts with the driver's current folder.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "relaygpt"

# A tiny-assistant run cut to a few steps of each stage, placed on Ray for every stage.
TINY_RUN = {
    "data": {"num_proc": 2, "synthetic": {"mentions_per_fact": 6}},
    "cluster": {"num_workers": 1, "launcher": "ray", "max_failures": 0},
    "stages": {
        "pretrain": {"steps": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": 2, "micro_batch": 4,
                     "optimizer": {"warmup_steps": 1}},
        "sft": {"steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "micro_batch": 4,
                "optimizer": {"warmup_steps": 1}},
        "eval": {"models": ["assistant"], "limit": 2, "workers": 2, "batch_size": 2},
    },
}


def _merge(base: dict, extra: dict) -> dict:
    return {k: _merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in {**base, **extra}.items()}


def _planted(marker: Path) -> str:
    """A module that says it ran (in `marker`) and then fails its import."""
    return (f"import os, pathlib\n"
            f"pathlib.Path({str(marker)!r}).open('a').write(f'{{__name__}} ({{__file__}}) in pid {{os.getpid()}}\\n')\n"
            "raise ImportError('a planted module was imported: ' + __name__)\n")


def plant(folder: Path, marker: Path, packages=("cluster", "model", "pipelines", "jobs")) -> None:
    """A package of each name in `folder`, every module of the ones relaygpt imports first planted."""
    for name in packages:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(_planted(marker))
    if "model" in packages:
        for module in ("tokenizer", "errors", "export", "gpt"):
            (folder / "model" / f"{module}.py").write_text(_planted(marker))


def exported_model_with_a_planted_tokenizer(folder: Path, marker: Path, trained_tokenizer) -> Path:
    """`folder/model`: a model directory as relaygpt exports one (config.json, model.safetensors,
    tokenizer/; no __init__.py) with a `tokenizer.py` beside them."""
    from helpers import tiny_config
    from model.export import save_model_dir
    from model.gpt import GPT

    model_dir = save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab)), trained_tokenizer, folder / "model")
    (model_dir / "tokenizer.py").write_text(_planted(marker))
    return model_dir


def console(*args, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """The `relaygpt` console script, run in `cwd`."""
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def _ok(proc: subprocess.CompletedProcess, marker: Path) -> None:
    planted = marker.read_text() if marker.exists() else ""
    assert not planted, f"planted code ran:\n{planted}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_no_planted_package_is_imported_by_the_driver_or_any_ray_worker(ray_head, tmp_path, trained_tokenizer):
    """From a folder holding an exported `model/` with a planted `tokenizer.py` (and planted
    `cluster/`, `pipelines/`, `jobs/`), with the same packages planted beside the job file:
    `data prepare`, `run` (pretrain, sft, eval), and `generate --workers 2` all work and import
    nothing planted, on the driver or on any Ray worker."""
    marker = tmp_path / "PLANTED_CODE_RAN"
    work, job_dir, out = tmp_path / "work", tmp_path / "job", tmp_path / "out"
    work.mkdir()
    job_dir.mkdir()
    exported_model_with_a_planted_tokenizer(work, marker, trained_tokenizer)
    plant(work, marker, packages=("cluster", "pipelines", "jobs"))
    plant(job_dir, marker)
    job = _merge(yaml.safe_load((REPO / "jobs" / "tiny-assistant.yaml").read_text()), TINY_RUN)
    job["cluster"]["address"] = ray_head.address
    (job_dir / "job.yaml").write_text(yaml.safe_dump(job))
    run = out / "tiny-assistant" / "default"

    _ok(console("data", "prepare", job_dir / "job.yaml", "--out", out, cwd=work, env=ray_head.env), marker)
    proc = console("run", job_dir / "job.yaml", "--out", out, cwd=work, env=ray_head.env)
    _ok(proc, marker)
    assert "(cached)" in proc.stdout, proc.stdout  # the shards `data prepare` wrote on Ray Data
    assert json.loads((run / "eval" / "metrics.json").read_text())
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "Where", "Who")))
    proc = console("generate", run / "sft" / "model", "--prompts", prompts, "--out", work / "o.jsonl", "--workers", 2,
                   "--max-new-tokens", 3, "--address", ray_head.address, cwd=work, env=ray_head.env)
    _ok(proc, marker)
    assert len((work / "o.jsonl").read_text().splitlines()) == 3
    # Ray ran the workers with this folder first on their path (what made the planted code run before).
    workers = [json.loads(p.read_text()) for p in (run / "pretrain" / "workers").glob("rank_*.json")]
    assert workers and all(w["node_id"] != "local" for w in workers), workers


def test_local_ranks_and_python_dash_m_import_relaygpts_own_packages(tmp_path, trained_tokenizer):
    """Local training ranks start in the driver's folder: a run there (no Ray: one worker, data
    in the driver), with all four packages planted, trains and imports nothing planted. And
    `python -m cluster.cli`, which puts the current folder first on the driver's path, imports
    relaygpt's `model`, `pipelines` and `jobs` (a planted `cluster/` is what `-m cluster.cli`
    itself asks Python to run: the console script has no such folder on its path)."""
    marker = tmp_path / "PLANTED_CODE_RAN"
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    exported_model_with_a_planted_tokenizer(work, marker, trained_tokenizer)
    plant(work, marker, packages=("cluster", "pipelines", "jobs"))
    overrides = ["data.num_proc=1", "data.synthetic.mentions_per_fact=2", "cluster.num_workers=1", "cluster.launcher=local",
                 "stages.pretrain.steps=2", "stages.pretrain.log_every=1", "stages.pretrain.eval_every=2",
                 "stages.pretrain.checkpoint_every=2", "stages.pretrain.micro_batch=2", "stages.pretrain.optimizer.warmup_steps=1",
                 "stages.sft=null", "stages.eval=null"]
    settings = [arg for o in overrides for arg in ("--set", o)]
    job = REPO / "jobs" / "tiny-assistant.yaml"
    _ok(console("run", job, "--out", out, *settings, cwd=work, env={"RAY_ADDRESS": ""}), marker)
    workers = [json.loads(p.read_text()) for p in (out / "tiny-assistant" / "default" / "pretrain" / "workers").glob("rank_*.json")]
    assert [w["node_id"] for w in workers] == ["local"]

    (work / "cluster" / "__init__.py").unlink()
    (work / "cluster").rmdir()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", job, "--out", out, *settings], cwd=work,
                          capture_output=True, text=True, timeout=300)
    _ok(proc, marker)
