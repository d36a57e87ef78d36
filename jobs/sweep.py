"""The sweep file: a base job plus the points to measure it at.

    name: sweep-cpu-demo
    base: tiny-assistant.yaml          # a job file, relative to this file
    set: [data.num_proc=1]              # overrides for every point
    grid:                               # every combination of these values
      workers: [1, 2]
      pipeline_stages: [1, 2]
      micro_batch: [4, 8]
    points: [{preset: small, workers: 2}]   # and/or explicit points, after the grid
    warmup_steps: 3                     # run, but not timed
    steps: 8                            # timed; null trains each point's own budget (steps or tokens)
    scaling: weak                       # weak: per-worker batch fixed; strong: global_batch fixed
    cost: {price_per_gpu_hour: 2.5}

Axes are short names (below) or any dotted job field (`model.n_layer`). A point whose job the
spec or the planner refuses (pipeline with ZeRO-2, workers not a multiple of the pipeline) is
not an error of the sweep: it is recorded as skipped, with the reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from jobs.spec import (MODEL_FIELDS, JobError, apply_override, did_you_mean, line_map, load_job, override_path,
                       validation_problems)
from model.errors import RelayError
from pipelines.settings import Strict
from pipelines.train.plan import data_parallel_size
from pipelines.yaml_file import read_yaml

# Short axis names; {stage} is the measured stage.
AXES = {
    "workers": "cluster.num_workers",
    "pipeline_stages": "stages.{stage}.deepspeed.pipeline_stages",
    "tensor_parallel": "stages.{stage}.deepspeed.tensor_parallel",
    "sequence_parallel": "stages.{stage}.deepspeed.sequence_parallel",
    "zero_stage": "stages.{stage}.deepspeed.zero_stage",
    "micro_batch": "stages.{stage}.micro_batch",
    "grad_accum": "stages.{stage}.grad_accum",
    "activation_checkpoint_interval": "stages.{stage}.deepspeed.activation_checkpoint_interval",
    "offload_optimizer": "stages.{stage}.deepspeed.offload_optimizer",
    "preset": "model.preset",
    "tokens": "stages.{stage}.tokens",
    "seq_len": "stages.{stage}.seq_len",
}


class CostSpec(Strict):
    price_per_gpu_hour: float | None = Field(None, ge=0)
    price_per_core_hour: float | None = Field(None, ge=0, description="for CPU-only points")


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = Field(description="the job file every point starts from (relative to the sweep file)")
    output_dir: str = Field("runs", description="results go to OUT/<name>/ (relative to the sweep file)")
    stage: Literal["pretrain", "sft"] = "pretrain"
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides for every point")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axis -> values; every combination is a point")
    points: list[dict[str, Any]] = Field(default_factory=list, description="explicit points (axis -> value), after the grid")
    warmup_steps: int = Field(2, ge=0, description="steps run before timing starts")
    steps: int | None = Field(8, ge=1, description="timed steps per point; null: each point's own steps or tokens budget")
    scaling: Literal["weak", "strong"] = Field("weak", description="weak: per-worker batch fixed; strong: global_batch fixed")
    global_batch: int | None = Field(None, ge=1, description="strong scaling: sequences per step, the same at every point")
    cost: CostSpec = CostSpec()

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        for axis, values in self.grid.items():
            if not values:
                problems.append(f"grid.{axis}: needs at least one value")
        if not self.grid and not self.points:
            problems.append("grid: a sweep needs a grid or points")
        if self.scaling == "strong" and self.global_batch is None:
            problems.append("global_batch: strong scaling keeps the global batch fixed; give it (sequences per step)")
        if self.scaling == "weak" and self.global_batch is not None:
            problems.append("global_batch: only strong scaling fixes the global batch; remove it or set scaling: strong")
        axes = set(self.grid) | {k for p in self.points for k in p}
        if self.scaling == "strong" and "grad_accum" in axes:
            problems.append("grid.grad_accum: strong scaling derives grad_accum from global_batch; sweep micro_batch instead")
        if self.steps is not None and "tokens" in axes:
            problems.append("steps: a tokens axis trains each point's budget; set steps: null")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self._base_dir / p

    def sweep_dir(self, output_dir: str | None = None) -> Path:
        return self.path(output_dir or self.output_dir) / self.name


@dataclass
class Point:
    """One configuration to measure: its axis values, the job overrides they make, and the job
    (None when it was refused, with the reason)."""

    index: int
    axes: dict[str, Any]
    overrides: list[str]
    job: Any = None
    reason: str | None = None

    @property
    def id(self) -> str:
        return f"p{self.index:03d}"

    @property
    def fingerprint(self) -> str:
        """Changes when anything that shapes the measurement changes (not when only the order does)."""
        return hashlib.sha256(json.dumps(self.overrides).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.axes.items())


def axis_key(axis: str, stage: str) -> str:
    return AXES.get(axis, axis).format(stage=stage)


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read and validate a sweep file (every problem at once, each with its file:line)."""
    path = Path(path)
    try:
        data, node = read_yaml(path, "sweep file")
    except RelayError as exc:
        raise JobError([str(exc)]) from None
    if not isinstance(data, dict):
        raise JobError([f"{path}: a sweep file is a YAML mapping (name:, base:, grid:, ...)"])
    overridden = {override_path(assignment): assignment for assignment in overrides}
    for assignment in overrides:
        apply_override(data, assignment)
    lines = line_map(node) if node is not None else {}
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(validation_problems(exc, str(path), lines, SweepSpec, overridden=overridden)) from None
    sweep._base_dir = path.resolve().parent
    if not sweep.path(sweep.base).is_file():
        raise JobError([f"{path}:{lines.get(('base',), '?')}: base: job file {sweep.path(sweep.base)} does not exist"])
    _check_axes(sweep, path, lines)
    return sweep


def _check_axes(sweep: SweepSpec, where: Path, lines: dict) -> None:
    """Every axis names a field of the job: a typo is an error of the sweep, not a skipped point."""
    base = load_job(sweep.path(sweep.base), _point_overrides(sweep, {})).resolved_dict()
    problems = []
    for axis in dict.fromkeys([*sweep.grid, *(k for p in sweep.points for k in p)]):
        key = axis_key(axis, sweep.stage)
        parts = key.split(".")
        node, ok = base, True
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                ok = False
                break
        if not ok and not (parts[0] == "model" and len(parts) == 2 and parts[1] in MODEL_FIELDS):
            line = lines.get(("grid", axis)) or next((n for k, n in lines.items() if k[:1] == ("points",) and k[-1:] == (axis,)), "?")
            problems.append(f"{where}:{line}: {'grid' if axis in sweep.grid else 'points'}.{axis}: not an axis ({', '.join(AXES)}) nor a field of the job"
                            f"{did_you_mean(axis, AXES)}")
    if problems:
        raise JobError(problems)


def expand_points(sweep: SweepSpec) -> list[Point]:
    """Every point of the sweep with its job, or the reason it cannot run."""
    combos = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())] if sweep.grid else []
    combos += [dict(p) for p in sweep.points]
    base_path = str(sweep.path(sweep.base))
    points = []
    for i, axes in enumerate(combos):
        point = Point(i, axes, _point_overrides(sweep, axes))
        try:
            point.job = load_job(base_path, point.overrides)
            if sweep.scaling == "strong":
                point.overrides.append(f"stages.{sweep.stage}.grad_accum={_strong_accum(sweep, point.job)}")
                point.job = load_job(base_path, point.overrides)
        except JobError as exc:
            point.reason = "; ".join(p.split(": ", 1)[-1] if p.startswith((base_path, "--set ")) else p for p in exc.problems)
        points.append(point)
    return points


def _point_overrides(sweep: SweepSpec, axes: dict[str, Any]) -> list[str]:
    stage = sweep.stage
    out = list(sweep.set) + [f"stages.{s}=null" for s in ("pretrain", "sft", "dpo", "eval") if s != stage]
    out += [f"{axis_key(k, stage)}={v if isinstance(v, str) else json.dumps(v)}" for k, v in axes.items()]
    # Each point logs every step (the timing), validates only at the end, and leaves no checkpoints or export behind.
    out += [f"stages.{stage}.log_every=1", f"stages.{stage}.eval_every=1000000000", f"stages.{stage}.save_checkpoints=false",
            f"stages.{stage}.export_model=false", f"stages.{stage}.global_batch=null"]
    if sweep.steps is not None:
        out += [f"stages.{stage}.steps={sweep.warmup_steps + sweep.steps}", f"stages.{stage}.tokens=null"]
    elif "tokens" in axes:
        out += [f"stages.{stage}.steps=null"]
    return out


def _strong_accum(sweep: SweepSpec, job) -> int:
    """grad_accum that keeps micro x accum x data-parallel equal to the sweep's global batch."""
    spec = getattr(job.stages, sweep.stage)
    ds = spec.deepspeed
    dp = data_parallel_size(job.cluster.num_workers, ds.pipeline_stages, ds.tensor_parallel, ds.sequence_parallel)
    per_step = spec.micro_batch * dp
    if sweep.global_batch % per_step:
        raise JobError([f"global_batch: {sweep.global_batch} sequences do not split into micro_batch {spec.micro_batch} "
                        f"x data-parallel {dp} (strong scaling needs a whole number of micro-batches per step)"])
    return sweep.global_batch // per_step
