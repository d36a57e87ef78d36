"""Run tracking beside TensorBoard: MLflow and Weights & Biases, chosen in the job file.

    tracking:
      mlflow: {uri: http://mlflow:5000, experiment: my-job}   # uri default: a file store in RUN/mlruns
      wandb: {mode: offline, project: my-job}

Rank 0 of a training stage sends what it writes to TensorBoard (every scalar of a logged step,
at its step) and, once, the resolved plan as parameters: the job with every default filled in
(`job.*`) and the stage's resolved numbers (`plan.*`: layout, batch arithmetic, steps,
precision, paths). Each stage is one tracked run, named `<job>/<run-id>/<stage>` and tagged
with the job, the run id and the stage; its id is kept in RUN/<stage>/tracking.json, so a
resumed stage goes on in the same tracked run. The packages are optional extras
(`relaygpt[mlflow]`, `relaygpt[wandb]`); a job naming one that is not installed is refused
before launch. MLflow's local file store is in maintenance mode (MLflow 3 refuses it unless
MLFLOW_ALLOW_FILE_STORE is set): a `file:` URI, the default, is what the job asked for, so
relaygpt sets that variable for its own client.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.settings import Strict

PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # job key -> the module its extra installs
MAX_PARAM_CHARS = 500  # MLflow's oldest servers' limit on a parameter value


class MlflowSpec(Strict):
    uri: str | None = Field(None, description="tracking URI (http(s)://, databricks, sqlite:///..., file:/path); default: "
                                              "MLFLOW_TRACKING_URI on the driver, else a file store in RUN/mlruns")
    experiment: str | None = Field(None, description="experiment name; default: the job's name")


class WandbSpec(Strict):
    mode: Literal["offline", "online"] = Field("offline", description="offline writes RUN/<stage>/wandb for `wandb sync`")
    project: str | None = Field(None, description="default: the job's name")
    entity: str | None = Field(None, description="team or user; default: wandb's default entity")


class TrackingSpec(Strict):
    """The job's `tracking:` section: where training scalars go besides TensorBoard."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None


@dataclasses.dataclass(frozen=True)
class TrackingPlan:
    """Tracking resolved on the driver (workers never read the driver's environment)."""

    run_name: str                      # <job>/<run-id>; a stage appends /<stage>
    tags: dict
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    wandb: dict | None = None          # mode, project, entity


def missing_packages(spec: TrackingSpec) -> list[str]:
    """One problem per tracker the job names whose package is not installed here."""
    return [f"tracking.{name}: the {module} package is not installed; pip install 'relaygpt[{name}]', or remove tracking.{name}"
            for name, module in PACKAGES.items() if getattr(spec, name) is not None and importlib.util.find_spec(module) is None]


def resolve_tracking(spec: TrackingSpec, job_name: str, run_root: Path) -> TrackingPlan | None:
    if spec.mlflow is None and spec.wandb is None:
        return None
    uri = None
    if spec.mlflow is not None:
        uri = spec.mlflow.uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_root / "mlruns").as_uri()
    wandb = None if spec.wandb is None else {"mode": spec.wandb.mode, "project": spec.wandb.project or job_name,
                                             "entity": spec.wandb.entity}
    return TrackingPlan(run_name=f"{job_name}/{run_root.name}", tags={"relaygpt.job": job_name, "relaygpt.run_id": run_root.name},
                        mlflow_uri=uri, mlflow_experiment=(spec.mlflow.experiment or job_name) if spec.mlflow else None, wandb=wandb)


def flat_params(value, prefix: str, out: dict | None = None) -> dict[str, str]:
    """Nested settings as `a.b.c` -> text (lists by index), each value cut to MAX_PARAM_CHARS."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, item in value.items():
            flat_params(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, item in enumerate(value):
            flat_params(item, f"{prefix}.{i}", out)
    else:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[prefix] = text[:MAX_PARAM_CHARS]
    return out


def plan_params(resolved: dict, stage_plan) -> dict[str, str]:
    """The resolved plan as parameters: `resolved`, the job with every default filled in (RunPlan.job),
    as `job.*`, and the stage's scalar numbers (`plan.*`)."""
    params = flat_params(resolved, "job")
    for field in dataclasses.fields(stage_plan):
        value = getattr(stage_plan, field.name)
        if isinstance(value, (bool, int, float, str, Path)) or value is None:
            params[f"plan.{field.name}"] = str(value)[:MAX_PARAM_CHARS]
    return params


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", name)


class Trackers:
    """The trackers of one stage on rank 0 (none elsewhere): scalars at their step, the plan once."""

    def __init__(self, plan: TrackingPlan | None, stage_root: Path, params: dict[str, str]) -> None:
        self.mlflow = self.wandb = None
        if plan is None:
            return
        record_file = stage_root / "tracking.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        name, tags = f"{plan.run_name}/{stage_root.name}", {**plan.tags, "relaygpt.stage": stage_root.name}
        if plan.mlflow_uri is not None:
            self.mlflow = _Mlflow(plan, name, tags, record.get("mlflow_run_id"), params)
            record["mlflow_run_id"] = self.mlflow.run_id
        if plan.wandb is not None:
            self.wandb = _Wandb(plan.wandb, name, tags, record.get("wandb_id"), params, stage_root)
            record["wandb_id"] = self.wandb.run.id
        stage_root.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if finite and self.mlflow is not None:
            self.mlflow.log(step, finite)
        if finite and self.wandb is not None:
            self.wandb.run.log(finite, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.client.set_terminated(self.mlflow.run_id, "FINISHED")
        if self.wandb is not None:
            self.wandb.run.finish()


class _Mlflow:
    def __init__(self, plan: TrackingPlan, name: str, tags: dict, run_id: str | None, params: dict[str, str]) -> None:
        if plan.mlflow_uri.startswith("file:"):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the job asked for a file store (see the module's docstring)
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=plan.mlflow_uri)
        if run_id is not None:  # a resumed stage: the same run, running again
            self.run_id = run_id
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        experiment = self.client.get_experiment_by_name(plan.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(plan.mlflow_experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_metric_name(k), v, now, step) for k, v in values.items()])


class _Wandb:
    def __init__(self, settings: dict, name: str, tags: dict, run_id: str | None, params: dict[str, str], stage_root: Path) -> None:
        import wandb

        self.run = wandb.init(project=settings["project"], entity=settings["entity"], mode=settings["mode"], name=name,
                              dir=str(stage_root), id=run_id or wandb.util.generate_id(), resume="allow", config=params,
                              tags=[f"{k}={v}" for k, v in tags.items()])
