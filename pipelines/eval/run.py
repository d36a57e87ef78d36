"""Evaluating models on tasks: the one function behind the eval stage and `relaygpt eval`.

Generation goes through a `generate(model_dir, rows, *, work, params=None, chat=False)` callable
that returns one result per row, in order: a Ray Data pool of generation workers
(cluster/launch.py) or the worker in this process. `work` names the worker's method
(pipelines/generation/worker.py): bits-per-byte and multiple-choice tasks send scoring rows
through the same callable and generate nothing. One scorer per metric (scorers.py).
"""

from __future__ import annotations

from pathlib import Path

from model.atomic import write_json_atomically, write_jsonl_atomically
from model.errors import RelayError
from pipelines.eval.report import write_report
from pipelines.eval.scorers import SCORERS, Scoring
from pipelines.eval.task_types import Task


def model_style(model_dir) -> str:
    """How a model is prompted: `chat` for an assistant (an export of an SFT stage, which was
    trained on the chat template), `completion` for anything else."""
    import json

    try:
        meta = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "completion"
    provenance = meta.get("provenance") if isinstance(meta, dict) else None
    return "chat" if isinstance(provenance, dict) and provenance.get("stage") in ("sft", "dpo") else "completion"


def evaluate_models(models: dict[str, Path], tasks: list[Task], generate, *, out=None, temperature: float = 0.0,
                    seed: int | None = None, samples_in_report: int = 3, show=None, styles: dict[str, str] | None = None,
                    system: str | None = None) -> dict[str, dict[str, float]]:
    """Every model on every task, each by its metric's scorer (scorers.py); returns {model: {task: score}}.

    An assistant is prompted through its chat template (with `system` as the system prompt and
    few-shot examples as earlier turns), a base model with completion / few-shot prompts
    (`model_style`; `styles` overrides it per model); a chat-only task (synthetic) is chat for
    every model. With `out` (an EvalDir) writes predictions.jsonl, metrics.json, report.md
    (which says the prompt style of every score) and TensorBoard scalars there. `show`
    receives one line per model and task.
    """
    if out is not None:  # an older result must not look like this evaluation's, finished or not
        out.metrics.unlink(missing_ok=True)
    metrics: dict[str, dict[str, float]] = {}
    predictions: list[dict] = []
    used: dict[str, dict[str, str]] = {}
    for model, model_dir in models.items():
        if not Path(model_dir).is_dir():
            raise RelayError(f"{model}: no model directory at {model_dir}")
        metrics[model], used[model] = {}, {}
        preferred = (styles or {}).get(model) or model_style(model_dir)
        for task in tasks:
            scores = SCORERS[task.metric](Scoring(model, model_dir, task, generate, preferred, temperature, seed, system))
            metrics[model].update(scores.metrics)
            used[model].update(scores.styles)
            predictions += scores.predictions
            if show:
                show(scores.line)
    if out is not None:
        write_outputs(out, metrics, predictions, samples_in_report, used)
    return metrics


def write_outputs(out, metrics: dict, predictions: list[dict], samples_in_report: int, styles: dict | None = None) -> None:
    """predictions.jsonl, report.md, TensorBoard scalars and, last, metrics.json in `out` (an
    EvalDir): each file atomic, and the results file only once everything else is written, so
    an interrupted evaluation never leaves a complete-looking metrics.json."""
    from pipelines.train.metrics import Board

    write_jsonl_atomically(out.predictions, predictions)
    write_report(out.report, metrics, predictions, samples_in_report, styles)
    board = Board(out.tensorboard)
    for model, scores in metrics.items():
        board.scalars(0, {f"eval/{model}/{task}": value for task, value in scores.items()})
        board.text(f"eval/{model}/samples", "\n\n".join(f"{p['input']} -> {p['prediction']} (ref {p['reference']})"
                                                       for p in predictions if p["model"] == model)[:4000])
    board.close()
    write_json_atomically(out.metrics, metrics)
