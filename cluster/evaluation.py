"""The one entry of an evaluation: the eval stage of `relaygpt run` and `relaygpt eval` both call
`run_eval` with an EvalPlan (pipelines/eval/settings.py) and a placement of the generation.

The stage's plan comes from the job (jobs/plan.py) and its generation runs on the run's Ray
Data pool (`on_ray`); the command's plan comes from its flags and its generation runs in this
process for one worker, else on a pool of its own (cluster/generation_commands.py). Everything
between (the tasks, a progress bar per model, the scorers, the report) is this one function.
"""

from __future__ import annotations

from typing import Callable

# place(model_dir, rows, params, *, chat, work, progress) -> rows: where the generation of a batch of rows runs
Place = Callable[..., list]


def load_tasks(plan, data_file: str | None = None) -> list:
    """The plan's tasks loaded (a shipped name, a task file, `synthetic` from the plan's world);
    `data_file` stands in for the source of a task's data (`relaygpt eval --data`)."""
    from pipelines.eval.task import load_task

    return [load_task(task, synthetic=plan.synthetic, limit=plan.limit, data_file=data_file) for task in plan.tasks]


def run_eval(plan, out, place: Place, *, tasks: list | None = None, show=None, live=None, styles=None) -> dict[str, dict[str, float]]:
    """Every model of `plan` on every task of it ({model: {task: score}}), written to `out` (an
    EvalDir, or None). `tasks`: already loaded (`load_tasks`), else loaded here. `show` gets a line
    per model and task; `live`, where given, a progress bar per model's generation (None ends it:
    the last bar stays as a line, also when generation fails). `styles` overrides the prompt style
    per model (pipelines/eval/run.py)."""
    from pipelines.eval.run import evaluate_models

    tasks = load_tasks(plan) if tasks is None else tasks
    names = {str(path): model for model, path in plan.models.items()}

    def generate(model_dir, rows, *, work, params=None, chat=False):
        progress = None
        if live is not None:
            from cluster.console import RateMeter, bar, eta

            label, meter = f"[eval] {names.get(str(model_dir), model_dir)}", RateMeter(len(rows))
            progress = lambda done: live(f"{label} {bar(done, len(rows))} {done}/{len(rows)} rows  eta {eta(meter.eta_s(done))}")
        try:
            return place(model_dir, rows, params or {}, chat=chat, work=work, progress=progress)
        finally:
            if live is not None:
                live(None)

    return evaluate_models(plan.models, tasks, generate, out=out, temperature=plan.temperature, seed=plan.seed,
                           samples_in_report=plan.samples_in_report, show=show, styles=styles, system=plan.system_prompt)


def on_ray(plan) -> Place:
    """Generation on a Ray Data actor pool of the plan's size (Ray already started)."""
    from cluster.launch import generate_on_ray

    def place(model_dir, rows, params, *, chat, work, progress):
        return generate_on_ray(model_dir, rows, params, chat=chat, work=work, workers=plan.workers,
                               cpus_per_worker=plan.cpus_per_worker, gpus_per_worker=plan.gpus_per_worker,
                               batch_size=plan.batch_size, progress=progress)

    return place
