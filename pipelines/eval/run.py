"""Evaluating models on tasks: the one function behind the eval stage and `relaygpt eval`.

Generation goes through a `generate(model_dir, rows, params, chat)` callable that returns one
result per row, in order: a Ray Data pool of generation workers (cluster/launch.py) or the
worker in this process. Bits-per-byte and multiple-choice tasks send scoring rows through the
same callable (pipelines/generation/worker.py) and generate nothing.
"""

from __future__ import annotations

from pathlib import Path

from model.atomic import write_json_atomically, write_jsonl_atomically
from model.errors import RelayError
from pipelines.eval.report import write_report
from pipelines.eval.task import Task, apply_stops, choice_row, choice_scores, render_prompt, score, summarise


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
    """Every model on every task; returns {model: {task: score}}.

    An assistant is prompted through its chat template (with `system` as the system prompt and
    few-shot examples as earlier turns), a base model with completion / few-shot prompts
    (`model_style`; `styles` overrides it per model); a chat-only task (synthetic) is chat for
    every model. With `out` (an EvalDir) writes predictions.jsonl, metrics.json, report.md
    (which says the prompt style of every score) and TensorBoard scalars there. `show`
    receives one line per model and task.
    """
    from model.chat import strip_reply

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
            if task.metric in ("bpb", "loglikelihood"):
                used[model][task.name] = "likelihood"
            if task.metric == "loglikelihood":
                used[model][f"{task.name}_norm"] = "likelihood"
            if task.metric == "bpb":  # no generation: the likelihood of held-out text, on the pool
                from pipelines.train.metrics import bits_per_byte

                scored = generate(str(model_dir), [{"score_text": ex["target"]} for ex in task.examples], {}, False)
                metrics[model][task.name] = bits_per_byte(sum(r["nats"] for r in scored), sum(r["bytes"] for r in scored))
                if show:
                    show(f"[eval] {model}: {task.name} {metrics[model][task.name]:.4f} bits per byte ({len(task.examples)} texts)")
                continue
            if task.metric == "loglikelihood":  # multiple choice: every continuation scored on the pool
                results = generate(str(model_dir), [choice_row(task, ex) for ex in task.examples], {}, False)
                accs, norms = [], []
                for ex, res in zip(task.examples, results):
                    picked = choice_scores(ex, res["loglikelihoods"])
                    accs.append(picked["acc"])
                    norms.append(picked["acc_norm"])
                    predictions.append({"model": model, "task": task.name, "input": ex["context"], "reference": ex["target"],
                                        "prediction": ex["continuations"][picked["prediction"]], "correct": bool(picked["acc"]),
                                        "context": res["context"], "continuations": ex["continuations"], "label": ex["label"],
                                        "loglikelihoods": res["loglikelihoods"], "num_tokens": res["num_tokens"],
                                        "prediction_norm": picked["prediction_norm"], "correct_norm": bool(picked["acc_norm"])})
                metrics[model][task.name] = sum(accs) / len(accs)
                metrics[model][f"{task.name}_norm"] = sum(norms) / len(norms)
                if show:
                    show(f"[eval] {model}: {task.name} acc {metrics[model][task.name]:.3f}, "
                         f"acc_norm {metrics[model][task.name + '_norm']:.3f} ({len(accs)} questions)")
                continue
            style = "chat" if task.style == "chat" else preferred
            used[model][task.name] = style
            rows = [render_prompt(task, ex, style=style, system=system) for ex in task.examples]
            _check_prompts_fit(model_dir, task, rows, style == "chat")
            params = {"max_new_tokens": task.max_new_tokens, "temperature": temperature, "seed": seed}
            results = generate(str(model_dir), rows, params, style == "chat")
            scored = []
            for ex, res in zip(task.examples, results):
                text = apply_stops(res["completion"], task.stop)
                text = strip_reply(text) if style == "chat" else text
                correct = score(task.metric, text, ex["target"])
                scored.append(correct)
                predictions.append({"model": model, "task": task.name, "input": ex["input"], "reference": ex["target"],
                                    "prediction": text, "correct": correct, "finish_reason": res["finish_reason"], "style": style})
            metrics[model][task.name] = summarise(task, scored)
            if show:
                show(f"[eval] {model}: {task.name} {metrics[model][task.name]:.3f} ({sum(scored)}/{len(scored)})")
    if out is not None:
        write_outputs(out, metrics, predictions, samples_in_report, used)
    return metrics


def _check_prompts_fit(model_dir, task: Task, rows: list[dict], chat: bool) -> None:
    """Every prompt of `task` leaves room to generate in the model's context, checked before
    any generation (a worker would otherwise fail on the first long one, after the others' work)."""
    from model.export import open_model_weights
    from pipelines.generation.rows import prompt_ids

    config, tokenizer, _ = open_model_weights(model_dir)  # a native directory's weights are not read
    context = config.block_size
    for i, row in enumerate(rows):
        length = len(prompt_ids(row, tokenizer, chat, f"task {task.name}: example {i}"))
        if length >= context:
            cause = (f" with its {task.shots} few-shot example(s)", f"; lower the task's shots (now {task.shots})") if task.shots \
                else ("", "; it needs a model with a longer context or shorter inputs")
            raise RelayError(f"task {task.name}: example {i}'s prompt is {length} tokens{cause[0]}, but {model_dir} has a "
                             f"{context}-token context (prompts of at most {context - 1} tokens){cause[1]}")


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
