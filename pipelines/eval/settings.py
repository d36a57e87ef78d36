"""Settings of the eval stage (composed into the job file as stages.eval)."""

from __future__ import annotations

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
