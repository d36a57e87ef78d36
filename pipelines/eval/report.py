"""The evaluation report: a score table and sample answers, as Markdown."""

from __future__ import annotations

from pathlib import Path

from model.atomic import write_text_atomically


def write_report(path: Path, metrics: dict, predictions: list[dict], samples: int = 3, styles: dict | None = None) -> None:
    """`styles`: {model: {task: prompt style}} (chat, completion, likelihood), shown beside each score."""
    models = list(metrics)
    tasks = sorted({t for m in metrics.values() for t in m})
    lines = ["# Evaluation", "", "| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for task in tasks:
        cells = []
        for m in models:
            style = (styles or {}).get(m, {}).get(task)
            cells.append(f"{metrics[m].get(task, float('nan')):.3f}" + (f" ({style})" if style else ""))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Scores are exact match (after normalisation) or accuracy; bits per byte for `bpb` tasks; "
              "`<task>_norm` is accuracy by log-likelihood per character; a preference task's score is its preference accuracy "
              "(the fraction of pairs whose chosen answer the model gives the higher log-probability). Beside each score, how the model was "
              "prompted: chat (its chat template), completion (plain or few-shot text) or likelihood (nothing generated).", ""]
    for task in tasks:
        lines += [f"## Sample answers: {task}", ""]
        for model in models:
            rows = [p for p in predictions if p["task"] == task and p["model"] == model][:samples]
            for p in rows:
                mark = "✓" if p.get("correct") else "✗"
                lines.append(f"- **{model}** {mark} `{_short(p['input'])}` → `{_short(p['prediction'])}` (reference `{_short(p['reference'])}`)")
        lines.append("")
    write_text_atomically(path, "\n".join(lines))


def _short(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"

