"""A tiny synthetic training job for the engine tests, and a runner over N processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from dist_workers import train_and_record
from distributed import run_distributed

BASE_JOB = {
    "name": "engine",
    "seed": 7,
    "model": {"preset": "tiny", "n_layer": 4, "n_embd": 64, "n_head": 4, "block_size": 32},
    "tokenizer": {"train": {"vocab_size": 768}},
    "data": {"num_proc": 1, "pretrain": {"sources": [{"type": "synthetic"}]}, "sft": {"seq_len": 32, "sources": [{"type": "synthetic"}]}},
    "stages": {
        "pretrain": {"steps": 6, "micro_batch": 4, "grad_accum": 1, "log_every": 1, "eval_every": 3, "checkpoint_every": 3,
                     "keep_last": 5, "optimizer": {"lr": 3e-3, "warmup_steps": 2}, "deepspeed": {"zero_stage": 0}},
        "sft": {"steps": 4, "micro_batch": 4, "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
    },
}


def write_base_job(directory: Path) -> Path:
    path = Path(directory) / "engine.yaml"
    path.write_text(yaml.safe_dump(BASE_JOB))
    return path


def prepared_run(job_path: Path, template_run: Path, run_dir: Path) -> Path:
    """A fresh run directory holding a copy of the prepared tokenizer and data."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for part in ("tokenizer", "data"):
        shutil.copytree(template_run / part, run_dir / part)
    return run_dir


def train(world_size: int, job_path: Path, run_dir: Path, overrides=(), stage="pretrain", until_step=None) -> dict:
    return run_distributed(train_and_record, world_size, str(job_path), list(overrides), stage, str(run_dir), until_step)[0]


def weights(run_dir: Path, stage: str = "pretrain") -> dict:
    """The exported weights of a stage."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / stage / "model" / "model.safetensors"))


def assert_losses_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys() and len(a) >= 5
    for step in a:
        assert abs(a[step] - b[step]) < tol, f"step {step}: {a[step]} vs {b[step]}"
