"""Preference tasks: how often a model's log-probability favours the chosen answer of a pair.

A task file with `metric: preference_accuracy` reads rows (JSON lines, or a JSON list)

    {"prompt": "text" | [{"role": ..., "content": ...}, ...], "chosen": "text", "rejected": "text"}

Each side is rendered with the chat template (model/chat.py), as SFT and DPO render an answer:
the prompt's turns and an open assistant header are the context, and the answer's content with
its <|end|> the continuation. The pool's scoring workers (model/score.py) give the summed
log-probability of each side's continuation; a pair counts as won when the chosen side's sum is
the larger. The task's score, under its name beside the other tasks, is that fraction
(preference_accuracy); predictions.jsonl keeps both sums of every pair. As for multiple choice,
a context longer than the model's window loses its oldest tokens.

A row with a side missing, identical sides or a malformed prompt is refused in one line naming
the data file and the row.
"""

from __future__ import annotations

from model.chat import ROLES, render_chat
from model.errors import RelayError
from model.tokenizer import Tokenizer
from pipelines.eval.task_types import Task

METRIC = "preference_accuracy"
SIDES = ("chosen", "rejected")


def preference_task(spec: dict, rows: list, where: str, data: str, stem: str, limit: int | None) -> Task:
    """The Task of a preference file: every row checked (`data` names the rows' file in errors)."""
    examples = [_pair(row, f"{data}: row {i + 1}") for i, row in enumerate(rows)]
    task = Task(name=spec.get("name", stem), metric=METRIC, style="chat", examples=examples[:limit] if limit else examples)
    if not task.examples:
        raise RelayError(f"{where}: no preference pairs to evaluate in {data}")
    return task


def _pair(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise RelayError(f"{where}: expected a JSON object with prompt, chosen and rejected, got {type(row).__name__}")
    for key in ("prompt", *SIDES):
        if row.get(key) is None:
            raise RelayError(f"{where}: no {key!r} (fields: {', '.join(sorted(row)) or 'none'}); "
                             "a pair needs a prompt, a chosen and a rejected answer")
    for side in SIDES:
        if not isinstance(row[side], str) or not row[side].strip():
            raise RelayError(f"{where}: {side} must be non-empty text, got {str(row[side])[:40]!r}")
    if row["chosen"].strip() == row["rejected"].strip():
        raise RelayError(f"{where}: chosen and rejected are identical ({row['chosen'][:40]!r}); a pair must differ")
    messages = _prompt_messages(row["prompt"], where)
    return {"input": messages[-1]["content"], "messages": messages, "chosen": row["chosen"], "rejected": row["rejected"],
            "target": row["chosen"]}


def _prompt_messages(prompt, where: str) -> list[dict]:
    """A prompt as chat messages: text is one user turn; a list must be {role, content} turns."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RelayError(f"{where}: prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise RelayError(f"{where}: prompt must be text or a non-empty list of {{\"role\", \"content\"}} messages")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise RelayError(f"{where}: prompt message {i} must be {{\"role\": {' | '.join(ROLES)}, \"content\": text}}, "
                             f"got {str(message)[:60]}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def pair_request(tokenizer: Tokenizer, example: dict) -> dict:
    """The scoring row of one pair: the rendered prompt (context) and each side's answer tokens."""
    context = render_chat(tokenizer, example["messages"], add_generation_prompt=True)[0]
    answers = []
    for side in SIDES:
        whole = render_chat(tokenizer, example["messages"] + [{"role": "assistant", "content": example[side]}])[0]
        assert whole[: len(context)] == context  # the open header is the answer turn's first token
        answers.append(whole[len(context):])
    return {"context_tokens": context, "continuation_tokens": answers}
