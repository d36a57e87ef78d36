"""Evaluation tasks: loading, prompts and scoring.

A task is a YAML file (shipped ones live in pipelines/eval/tasks/, any other path works too):

    name: gsm8k
    source: {file: path/to/test.jsonl}          # or {hub: openai/gsm8k, config: main, split: test}
    input_field: question
    target_field: answer
    metric: numeric          # exact_match | numeric | multiple_choice | bpb
    style: completion        # or chat (rendered with the chat template)
    prompt: "Question: {input}\\nAnswer:"
    shots: 0                 # few-shot examples, taken from the front and not scored
    max_new_tokens: 256
    stop: ["\\n\\n"]

`synthetic` is built in: the held-out questions of the job's synthetic world, chat style.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.errors import RelayError

TASK_DIR = Path(__file__).with_name("tasks")
METRICS = ("exact_match", "numeric", "multiple_choice", "bpb")


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
    fewshot: list[dict] = field(default_factory=list)


# ---- answers ------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD-style)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """GSM8K's convention: the number after '####', else the last number in the text."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        return _canonical_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


def _canonical_number(raw: str) -> str:
    value = raw.replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else str(number)


def score(metric: str, prediction: str, target: str) -> bool:
    if metric == "numeric":
        return extract_number(prediction) is not None and extract_number(prediction) == extract_number(target)
    if metric == "multiple_choice":
        # BBH targets are short: "(B)", "True", "42". The answer is the first line's leading token(s).
        first = prediction.strip().split("\n")[0]
        return normalize(first).startswith(normalize(target)) and normalize(target) != ""
    return normalize(prediction) == normalize(target)


# ---- loading ------------------------------------------------------------------------------

def _read_rows(source: dict, where: str, base: Path) -> list[dict]:
    if "file" in source:
        path = Path(source["file"]).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise RelayError(f"{where}: data file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise RelayError(f"{path}:{n}: malformed JSON line ({exc.msg})") from None
            return rows
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RelayError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        return data["examples"] if isinstance(data, dict) and "examples" in data else data
    if "hub" in source:
        import datasets

        try:
            return datasets.load_dataset(source["hub"], source.get("config"), split=source.get("split", "test")).to_list()
        except Exception as exc:
            raise RelayError(f"{where}: hub dataset {source['hub']!r} could not be loaded ({type(exc).__name__}); "
                             "offline, set source: {file: ...} to a local copy") from None
    raise RelayError(f"{where}: source needs 'file' or 'hub'")


def load_task(name_or_file: str, *, job=None, limit: int | None = None, data_file: str | None = None) -> Task:
    """A shipped task by name, a task YAML file, or `synthetic` (needs the job)."""
    if name_or_file == "synthetic":
        return _synthetic_task(job, limit)
    path = Path(name_or_file)
    if not path.suffix:
        path = TASK_DIR / f"{name_or_file}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
        raise RelayError(f"task {name_or_file!r}: neither a task file nor a shipped task ({', '.join(['synthetic', *shipped])})")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RelayError(f"{path}: invalid YAML ({exc})") from None
    where = str(path)
    unknown = sorted(set(spec) - {"name", "source", "input_field", "target_field", "metric", "style", "prompt", "shots", "max_new_tokens", "stop", "target_prefix"})
    if unknown:
        raise RelayError(f"{where}: unknown key(s) {', '.join(unknown)}")
    metric = spec.get("metric", "exact_match")
    if metric not in METRICS:
        raise RelayError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    source = {"file": data_file} if data_file else spec.get("source", {})
    rows = _read_rows(source, where, path.parent)
    input_field, target_field = spec.get("input_field", "input"), spec.get("target_field", "target")
    examples = []
    for i, row in enumerate(rows):
        if metric != "bpb" and (input_field not in row or target_field not in row):
            raise RelayError(f"{where}: example {i} lacks '{input_field}' or '{target_field}' (fields: {', '.join(sorted(row))})")
        if metric == "bpb" and target_field not in row and "text" not in row:
            raise RelayError(f"{where}: example {i} has no '{target_field}' or 'text' field to score (fields: {', '.join(sorted(row))})")
        examples.append({"input": row.get(input_field, ""), "target": str(row.get(target_field, row.get("text", "")))})
    shots = int(spec.get("shots", 0))
    task = Task(name=spec.get("name", path.stem), metric=metric, style=spec.get("style", "completion"),
                prompt=spec.get("prompt", "{input}"), shots=shots, max_new_tokens=int(spec.get("max_new_tokens", 32)),
                stop=list(spec.get("stop", [])), fewshot=examples[:shots], examples=examples[shots:])
    if limit is not None:
        task.examples = task.examples[:limit]
    if not task.examples:
        raise RelayError(f"{where}: no examples to evaluate")
    return task


def _synthetic_task(job, limit: int | None) -> Task:
    from pipelines.data import synthetic

    if job is None:
        raise RelayError("task 'synthetic' needs a job file (it is the job's held-out synthetic questions)")
    s = job.data.synthetic
    world = synthetic.build_world(s.seed, s.num_people, s.held_out_fraction)
    examples = [{"input": e["messages"][-1]["content"], "messages": e["messages"], "target": e["answer"]} for e in synthetic.eval_examples(world)]
    return Task(name="synthetic", metric="exact_match", style="chat", max_new_tokens=16, examples=examples[:limit] if limit else examples)


def render_prompt(task: Task, example: dict) -> dict:
    """The generation row of one example: chat messages or completion text (with few-shot)."""
    if task.style == "chat":
        messages = []
        for shot in task.fewshot:
            messages += [{"role": "user", "content": task.prompt.format(input=shot["input"])},
                         {"role": "assistant", "content": shot["target"]}]
        messages += example.get("messages") or [{"role": "user", "content": task.prompt.format(input=example["input"])}]
        return {"messages": messages}
    shots = "".join(task.prompt.format(input=s["input"]) + " " + s["target"] + "\n\n" for s in task.fewshot)
    return {"prompt": shots + task.prompt.format(input=example["input"])}



def apply_stops(text: str, stops: list[str]) -> str:
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def summarise(task: Task, scored: list[bool]) -> float:
    return sum(scored) / len(scored) if scored else math.nan

