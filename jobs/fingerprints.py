"""Each stage's fingerprint: its settings, the contents of the files it reads, and its upstream
stage's fingerprint. A re-run skips a completed stage whose fingerprint is unchanged."""

from __future__ import annotations

import hashlib
import json

from pipelines.rundir import EXPORT_NAMES, TRAINING_STAGES


def stage_inputs(job, hashes=None, data=None) -> dict[str, dict[str, str]]:
    """{stage: {file: sha256}} of what each stage reads besides its upstream stage's output: the
    data stage its local source files and tokenizer files, a training stage its `init` directory,
    the eval stage its task files, their local data and model directories named by path. `data`:
    the job's DataPlan (jobs/plan.py data_plan), resolved here when not given."""
    from jobs.plan import data_plan, eval_task_path
    from pipelines.data.prepare import data_inputs
    from pipelines.inputs import FileHashes

    hashes = hashes or FileHashes()
    data = data or data_plan(job)
    input_label = data.label
    out = {"data": data_inputs(data, hashes)}
    for name in TRAINING_STAGES:
        settings = getattr(job.stages, name)
        if settings is not None and settings.init:
            init = job.path(settings.init)
            out[name] = hashes.directory(init, input_label(init))
    if job.stages.eval is not None:
        from pipelines.eval.task import task_files

        files: dict[str, str] = {}
        for task in job.stages.eval.tasks:
            for path in task_files(str(eval_task_path(job, task))):
                files[input_label(path)] = hashes.sha256(path)
        for model in job.stages.eval.models:
            if model not in EXPORT_NAMES and job.path(model).is_dir():
                files.update(hashes.directory(job.path(model), input_label(job.path(model))))
        if files:
            out["eval"] = files
    return out


def fingerprints(job, inputs: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Each stage's fingerprint: its own settings and input files (`stage_inputs`) chained with
    its upstream stage's."""
    inputs = stage_inputs(job) if inputs is None else inputs

    def digest(stage, *parts) -> str:
        read = inputs.get(stage)  # added only when there are files: a job that reads none keeps its fingerprints
        return hashlib.sha256(json.dumps([*parts, read] if read else parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    d = job.resolved_dict()
    out = {"data": digest("data", d["tokenizer"], d["data"], d["seed"], d["model"].get("block_size"))}
    layout = d["cluster"]["num_workers"]
    out["pretrain"] = digest("pretrain", out["data"], d["model"], d["stages"].get("pretrain"), layout)
    out["sft"] = digest("sft", out["pretrain"], d["stages"].get("sft"), layout)
    out["dpo"] = digest("dpo", out["sft"], d["stages"].get("dpo"), layout)
    out["eval"] = digest("eval", out["dpo"], d["stages"].get("eval"), d["data"]["synthetic"])
    return out
