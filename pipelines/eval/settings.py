"""Settings of the eval stage (composed into the job file as stages.eval)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.settings import Strict


class EvalStageSpec(Strict):
    """Batch generation workers (a Ray Data actor pool) scoring models on tasks."""

    models: list[str] = Field(default_factory=lambda: ["base", "assistant"],
                              description="base (the pretrain export), assistant (the SFT export) or model directories")
    tasks: list[str] = Field(default_factory=lambda: ["synthetic"], description="task names (pipelines/eval/tasks) or task files")
    workers: int = Field(1, ge=1, description="generation actors")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="examples per task")
    temperature: float = Field(0.0, ge=0)
    system_prompt: str | None = Field(None, description="the system prompt an assistant (a chat model) is evaluated with")
    samples_in_report: int = Field(3, ge=0)


@dataclass(frozen=True)
class EvalPlan:
    """The eval stage of a job, resolved once by jobs/plan.py: nothing below it reads the job.

    models: {name: model directory} (base and assistant are the run's exports); tasks: as
    `load_task` takes them (a shipped name, `synthetic`, or an absolute task file); synthetic:
    the job's synthetic world (data.synthetic), which the `synthetic` task asks its questions of.
    """

    models: dict[str, Path]
    tasks: tuple[str, ...]
    synthetic: Any
    seed: int | None  # the job's; None for `relaygpt eval` without a job
    limit: int | None = None
    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    batch_size: int = 16
    temperature: float = 0.0
    system_prompt: str | None = None
    samples_in_report: int = 3
