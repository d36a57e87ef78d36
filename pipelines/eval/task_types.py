"""The Task record every kind of task loads into (task.py; preference.py; harness.py), and
cutting a generated answer at a task's stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Task:
    name: str
    metric: str
    style: str = "completion"
    prompt: str = "{input}"
    shots: int = 0
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # {"input", "target"} (+ "messages" for chat)
    fewshot: list[dict] = field(default_factory=list)   # loglikelihood: + "context", "continuations", "label"
    format: str = ""
    limit: int | None = None  # harness tasks (metric "harness"): examples the harness evaluates


def apply_stops(text: str, stops: list[str]) -> str:
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
