"""One scorer per metric: a model's score on one task, its predictions and the prompt style.

Every scorer takes a `Scoring` (one model, one task, the pool) and returns `Scores`. The pool is
a `generate(model_dir, rows, *, work, params=None, chat=False)` callable returning one result
per row, in order, where `work` names the generation worker's method (worker.py: `complete`,
`score_choices`, `score_texts`). `SCORERS` maps a task's metric to its scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from model.errors import RelayError
from pipelines.eval.task import choice_row, choice_scores, render_prompt, score, summarise
from pipelines.eval.task_types import Task, apply_stops


@dataclass(frozen=True)
class Scoring:
    """One model on one task: `style` is the model's own prompt style (a chat task overrides it)."""

    model: str
    model_dir: Path
    task: Task
    generate: Callable
    style: str = "completion"
    temperature: float = 0.0
    seed: int | None = None
    system: str | None = None


@dataclass
class Scores:
    """{metric name: value}, {metric name: prompt style}, prediction rows and one line to show."""

    metrics: dict[str, float]
    styles: dict[str, str]
    line: str
    predictions: list[dict] = field(default_factory=list)


def score_bits_per_byte(s: Scoring) -> Scores:
    """No generation: the likelihood of held-out text, on the pool."""
    from pipelines.train.metrics import bits_per_byte

    task = s.task
    scored = s.generate(str(s.model_dir), [{"score_text": ex["target"]} for ex in task.examples], work="score_texts")
    value = bits_per_byte(sum(r["nats"] for r in scored), sum(r["bytes"] for r in scored))
    return Scores({task.name: value}, {task.name: "likelihood"},
                  f"[eval] {s.model}: {task.name} {value:.4f} bits per byte ({len(task.examples)} texts)")


def score_choices(s: Scoring) -> Scores:
    """Multiple choice: every continuation scored on the pool; acc and acc_norm."""
    task = s.task
    results = s.generate(str(s.model_dir), [choice_row(task, ex) for ex in task.examples], work="score_choices")
    accs, norms, predictions = [], [], []
    for ex, res in zip(task.examples, results):
        picked = choice_scores(ex, res["loglikelihoods"])
        accs.append(picked["acc"])
        norms.append(picked["acc_norm"])
        predictions.append({"model": s.model, "task": task.name, "input": ex["context"], "reference": ex["target"],
                            "prediction": ex["continuations"][picked["prediction"]], "correct": bool(picked["acc"]),
                            "context": res["context"], "continuations": ex["continuations"], "label": ex["label"],
                            "loglikelihoods": res["loglikelihoods"], "num_tokens": res["num_tokens"],
                            "prediction_norm": picked["prediction_norm"], "correct_norm": bool(picked["acc_norm"])})
    acc, acc_norm = sum(accs) / len(accs), sum(norms) / len(norms)
    norm = f"{task.name}_norm"
    return Scores({task.name: acc, norm: acc_norm}, {task.name: "likelihood", norm: "likelihood"},
                  f"[eval] {s.model}: {task.name} acc {acc:.3f}, acc_norm {acc_norm:.3f} ({len(accs)} questions)", predictions)


def score_generations(s: Scoring) -> Scores:
    """Generated answers, cut at the task's stops, compared with the target by the task's metric."""
    from model.chat import strip_reply

    task = s.task
    style = "chat" if task.style == "chat" else s.style
    rows = [render_prompt(task, ex, style=style, system=s.system) for ex in task.examples]
    _check_prompts_fit(s.model_dir, task, rows, style == "chat")
    params = {"max_new_tokens": task.max_new_tokens, "temperature": s.temperature, "seed": s.seed}
    results = s.generate(str(s.model_dir), rows, work="complete", params=params, chat=style == "chat")
    scored, predictions = [], []
    for ex, res in zip(task.examples, results):
        text = apply_stops(res["completion"], task.stop)
        text = strip_reply(text) if style == "chat" else text
        correct = score(task.metric, text, ex["target"])
        scored.append(correct)
        predictions.append({"model": s.model, "task": task.name, "input": ex["input"], "reference": ex["target"],
                            "prediction": text, "correct": correct, "finish_reason": res["finish_reason"], "style": style})
    value = summarise(task, scored)
    return Scores({task.name: value}, {task.name: style},
                  f"[eval] {s.model}: {task.name} {value:.3f} ({sum(scored)}/{len(scored)})", predictions)


def score_preferences(s: Scoring) -> Scores:
    """Preference pairs (pipelines/eval/preference.py): the fraction whose chosen answer the model
    gives the higher summed log-probability, both sides scored on the pool; nothing generated."""
    from model.export import read_model_tokenizer
    from pipelines.eval.preference import pair_request

    task, tokenizer = s.task, read_model_tokenizer(s.model_dir)
    results = s.generate(str(s.model_dir), [pair_request(tokenizer, ex) for ex in task.examples], work="score_choices")
    won, predictions = 0, []
    for ex, res in zip(task.examples, results):
        chosen, rejected = res["loglikelihoods"]
        won += chosen > rejected
        predictions.append({"model": s.model, "task": task.name, "input": ex["input"], "reference": ex["chosen"],
                            "prediction": ex["chosen"] if chosen > rejected else ex["rejected"], "correct": chosen > rejected,
                            "messages": ex["messages"], "chosen": ex["chosen"], "rejected": ex["rejected"],
                            "chosen_logprob": chosen, "rejected_logprob": rejected, "num_tokens": res["num_tokens"]})
    value = won / len(task.examples)
    return Scores({task.name: value}, {task.name: "likelihood"},
                  f"[eval] {s.model}: {task.name} preference accuracy {value:.3f} ({len(task.examples)} pairs)", predictions)


def score_harness(s: Scoring) -> Scores:
    """An lm-evaluation-harness task: the harness's own prompts and metrics, answered by the pool
    (pipelines/eval/harness.py); every number it reports, keyed `<task>/<metric>`."""
    from pipelines.eval.harness import run_harness_task

    values = run_harness_task(s.task.name, s.model_dir, s.generate, limit=s.task.limit, seed=s.seed)
    metrics = {f"{s.task.name}/{metric}": value for metric, value in values.items()}
    shown = ", ".join(f"{metric} {value:.3f}" for metric, value in values.items())
    return Scores(metrics, {name: "harness" for name in metrics}, f"[eval] {s.model}: {s.task.name} {shown} (lm-evaluation-harness)")


SCORERS: dict[str, Callable[[Scoring], Scores]] = {
    "harness": score_harness,
    "preference_accuracy": score_preferences,
    "exact_match": score_generations,
    "numeric": score_generations,
    "multiple_choice": score_generations,
    "bpb": score_bits_per_byte,
    "loglikelihood": score_choices,
}


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
