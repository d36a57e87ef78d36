"""Evaluation tasks: loading, prompts and scoring.

A task is a YAML file (shipped ones live in pipelines/eval/tasks/, any other path works too):

    name: gsm8k
    source: {file: path/to/test.jsonl}          # or {hub: openai/gsm8k, config: main, split: test}
    input_field: question
    target_field: answer
    metric: numeric          # exact_match | numeric | multiple_choice | bpb | loglikelihood | preference_accuracy
    style: completion        # or chat (rendered with the chat template)
    prompt: "Question: {input}\\nAnswer:"
    shots: 0                 # few-shot examples, taken from the front and not scored
    max_new_tokens: 256
    stop: ["\\n\\n"]

`synthetic` is built in: the held-out questions of the job's synthetic world, chat style.

`metric: loglikelihood` tasks are multiple choice scored without generating: every choice's
continuation is scored given the context (model/score.py) and the prediction is the choice
with the highest log-likelihood (`acc`) or the highest log-likelihood per character of the
continuation (`acc_norm`), as lm-evaluation-harness defines them. `format:` names how rows
become (context, continuations, label), with the harness's prompts:

    hellaswag  "{activity_label}: {ctx_a} {Ctx_b}" (bracketed WikiHow markers removed) -> " {ending}"
    arc        "Question: {question}\nAnswer:" -> " {choice}"           (ARC-Easy and ARC-Challenge)
    piqa       "Question: {goal}\nAnswer:" -> " {sol1}" | " {sol2}"
    mmlu       "The following are multiple choice questions (with answers) about {subject}.\n\n
                {question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:" -> " A" | " B" | " C" | " D"
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

from model.errors import RelayError
from pipelines.eval.task_types import Task
from pipelines.yaml_file import read_yaml

TASK_DIR = Path(__file__).with_name("tasks")
METRICS = ("exact_match", "numeric", "multiple_choice", "bpb", "loglikelihood", "preference_accuracy")


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
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RelayError(f"{path}: not UTF-8 at byte {exc.start} (task data must be UTF-8 JSON or JSON lines)") from None
        except IsADirectoryError:
            raise RelayError(f"{where}: data file {path} is a directory") from None
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise RelayError(f"{path}:{n}: malformed JSON line ({exc.msg})") from None
                    except RecursionError:
                        raise RelayError(f"{path}:{n}: JSON nested too deep") from None
            return rows
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RelayError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        except RecursionError:
            raise RelayError(f"{path}: JSON nested too deep") from None
        return data["examples"] if isinstance(data, dict) and "examples" in data else data
    if "hub" in source:
        import datasets

        try:
            return datasets.load_dataset(source["hub"], source.get("config"), split=source.get("split", "test")).to_list()
        except Exception as exc:
            raise RelayError(f"{where}: hub dataset {source['hub']!r} could not be loaded ({type(exc).__name__}); "
                             "offline, set source: {file: ...} to a local copy") from None
    raise RelayError(f"{where}: source needs 'file' or 'hub'")


def _source_label(source: dict, base: Path) -> str:
    """The rows' file as errors name it (or the hub dataset)."""
    if "file" in source:
        path = Path(source["file"]).expanduser()
        return str(path if path.is_absolute() else base / path)
    return f"hub dataset {source.get('hub')}"


def task_files(name_or_file: str) -> list[Path]:
    """The files of the user's that a task reads: its YAML file (a shipped one is part of
    relaygpt) and the local data file its `source` names; none for `synthetic` or hub data."""
    if name_or_file.startswith("harness:"):  # a local harness task file is read by the harness
        local = Path(name_or_file[len("harness:"):])
        return [local] if local.suffix in (".yaml", ".yml") and local.is_file() else []
    if name_or_file == "synthetic" or not Path(name_or_file).suffix:
        return []
    path = Path(name_or_file)
    if not path.is_file():
        return []
    spec = read_yaml(path, "task file")[0] or {}
    source = spec.get("source") if isinstance(spec, dict) else None
    files = [path]
    if isinstance(source, dict) and isinstance(source.get("file"), str):
        data = Path(source["file"]).expanduser()
        data = data if data.is_absolute() else path.parent / data
        if data.is_file():
            files.append(data)
    return files


def load_task(name_or_file: str, *, synthetic=None, limit: int | None = None, data_file: str | None = None) -> Task:
    """A shipped task by name, a task YAML file, or `synthetic` (needs the job's data.synthetic
    settings, `synthetic`)."""
    if name_or_file == "synthetic":
        return _synthetic_task(synthetic, limit)
    from pipelines.eval.harness import check_harness, harness_target, is_harness_task

    if is_harness_task(name_or_file):  # lm-evaluation-harness runs it (pipelines/eval/harness.py)
        check_harness(name_or_file)
        harness_target(name_or_file)
        return Task(name=name_or_file, metric="harness", style="likelihood", limit=limit)
    path = Path(name_or_file)
    if not path.suffix:
        path = TASK_DIR / f"{name_or_file}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
        raise RelayError(f"task {name_or_file!r}: neither a task file nor a shipped task ({', '.join(['synthetic', *shipped])})")
    spec = read_yaml(path, "task file")[0] or {}
    where = str(path)
    if not isinstance(spec, dict):
        raise RelayError(f"{where}: a task file is a YAML mapping (name:, source:, metric:, ...)")
    unknown = sorted(set(spec) - {"name", "source", "input_field", "target_field", "metric", "style", "prompt", "shots",
                                  "max_new_tokens", "stop", "target_prefix", "format"})
    if unknown:
        raise RelayError(f"{where}: unknown key(s) {', '.join(unknown)}")
    metric = spec.get("metric", "exact_match")
    if metric not in METRICS:
        raise RelayError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    _check_settings(spec, where)
    # --data names a file as the user typed it: relative to the current folder, not the task's.
    source = {"file": str(Path(data_file).expanduser().absolute())} if data_file else spec.get("source", {})
    rows = _read_rows(source, "--data" if data_file else where, path.parent)
    if metric == "loglikelihood":
        return _choice_task(spec, rows, where, path.stem, limit)
    if metric == "preference_accuracy":  # pairs scored by log-probability (pipelines/eval/preference.py)
        from pipelines.eval.preference import preference_task

        return preference_task(spec, rows, where, _source_label(source, path.parent), path.stem, limit)
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


def _check_settings(spec: dict, where: str) -> None:
    """The task's own settings, checked before any row is read: each problem names its key."""
    for key, least in (("shots", 0), ("max_new_tokens", 1)):
        value = spec.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise RelayError(f"{where}: {key}: expected a whole number >= {least}, got {value!r}")
    stop = spec.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RelayError(f"{where}: stop: expected a list of non-empty strings (e.g. [\"\\n\\n\"]), got {stop!r}")
    if spec.get("style", "completion") not in ("completion", "chat"):
        raise RelayError(f"{where}: style: expected completion or chat, got {spec.get('style')!r}")
    prompt = spec.get("prompt", "{input}")
    if not isinstance(prompt, str):
        raise RelayError(f"{where}: prompt: expected text holding {{input}}, got {prompt!r}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as exc:  # "Single '}' encountered", "expected '}' before end of string"
        raise RelayError(f"{where}: prompt: {exc}; write a literal brace as {{{{ or }}}}") from None
    unknown = sorted({n for n in names if n != "input"})
    if unknown:
        raise RelayError(f"{where}: prompt: unknown placeholder {{{unknown[0]}}}; the only placeholder is {{input}} "
                         "(write a literal brace as {{ or }})")


def _hellaswag_text(text: str) -> str:
    """The harness's clean-up of HellaSwag text: WikiHow's bracketed markers out, spaces fixed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> tuple[str, list[str], int]:
    if "ctx_a" in row:  # the hub's rows: the second part is capitalised as the harness does
        ctx = row["ctx_a"] + " " + row.get("ctx_b", "").capitalize()
    else:  # a local copy may keep only the joined `ctx`
        ctx = row["ctx"]
    context = _hellaswag_text(row.get("activity_label", "") + ": " + ctx)
    return context, [" " + _hellaswag_text(ending) for ending in row["endings"]], int(row["label"])


def _arc(row: dict) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    return (f"Question: {row['question']}\nAnswer:", [" " + text for text in row["choices"]["text"]],
            labels.index(row["answerKey"]))


def _piqa(row: dict) -> tuple[str, list[str], int]:
    return f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"])


def _mmlu(row: dict) -> tuple[str, list[str], int]:
    subject = row.get("subject", "").replace("_", " ")
    letters = "ABCD"[: len(row["choices"])]
    lines = [row["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(letters, row["choices"])]
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    return header + "\n".join(lines) + "\nAnswer:", [" " + letter for letter in letters], int(row["answer"])


CHOICE_FORMATS = {"hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa, "mmlu": _mmlu}


def _choice_task(spec: dict, rows: list[dict], where: str, stem: str, limit: int | None) -> Task:
    fmt = spec.get("format")
    if fmt not in CHOICE_FORMATS:
        raise RelayError(f"{where}: format must be one of {', '.join(CHOICE_FORMATS)} for metric loglikelihood, got {fmt!r}")
    examples = []
    for i, row in enumerate(rows):
        try:
            context, continuations, label = CHOICE_FORMATS[fmt](row)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise RelayError(f"{where}: example {i} is not a {fmt} row ({type(exc).__name__}: {exc}; fields: {fields})") from None
        if not 0 <= label < len(continuations):
            raise RelayError(f"{where}: example {i}: label {label} is not one of its {len(continuations)} choices")
        examples.append({"input": context, "target": continuations[label], "context": context,
                         "continuations": continuations, "label": label})
    shots = int(spec.get("shots", 0))
    task = Task(name=spec.get("name", stem), metric="loglikelihood", shots=shots, format=fmt,
                fewshot=examples[:shots], examples=examples[shots:])
    if limit is not None:
        task.examples = task.examples[:limit]
    if not task.examples:
        raise RelayError(f"{where}: no examples to evaluate")
    return task


def choice_row(task: Task, example: dict) -> dict:
    """The scoring row of a multiple-choice example: few-shot examples (context and correct
    continuation, blank-line separated) before its context."""
    shots = "".join(s["context"] + s["continuations"][s["label"]] + "\n\n" for s in task.fewshot)
    return {"context": shots + example["context"], "continuations": example["continuations"]}


def choice_scores(example: dict, loglikelihoods: list[float]) -> dict:
    """acc and acc_norm of one example (the harness's: the highest log-likelihood, and the
    highest log-likelihood per character of the choice; the space that joins it to the context,
    the harness's target delimiter, is not counted, as the harness does not count it)."""
    per_char = [ll / max(1, len(c) - c.startswith(" ")) for ll, c in zip(loglikelihoods, example["continuations"])]
    pick = max(range(len(loglikelihoods)), key=lambda i: loglikelihoods[i])
    pick_norm = max(range(len(per_char)), key=lambda i: per_char[i])
    return {"prediction": pick, "prediction_norm": pick_norm,
            "acc": float(pick == example["label"]), "acc_norm": float(pick_norm == example["label"])}


def _synthetic_task(s, limit: int | None) -> Task:
    from pipelines.data import synthetic

    if s is None:
        raise RelayError("task 'synthetic' needs a job file (it is the job's held-out synthetic questions)")
    world = synthetic.build_world(s.seed, s.num_people, s.held_out_fraction)
    examples = [{"input": e["messages"][-1]["content"], "messages": e["messages"], "target": e["answer"]}
                for e in synthetic.eval_examples(world, tuple(s.sft_facts))]
    return Task(name="synthetic", metric="exact_match", style="chat", max_new_tokens=16, examples=examples[:limit] if limit else examples)


def render_prompt(task: Task, example: dict, style: str | None = None, system: str | None = None) -> dict:
    """The generation row of one example: chat messages (few-shot examples as earlier turns,
    `system` first) or completion text (few-shot examples before it). `style` defaults to the
    task's own."""
    if (style or task.style) == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        for shot in task.fewshot:
            messages += [{"role": "user", "content": task.prompt.format(input=shot["input"])},
                         {"role": "assistant", "content": shot["target"]}]
        own = example.get("messages") or [{"role": "user", "content": task.prompt.format(input=example["input"])}]
        if own and own[0]["role"] == "system":  # the example brings its own system prompt
            messages = [m for m in messages if m["role"] != "system"]
        return {"messages": messages + own}
    shots = "".join(task.prompt.format(input=s["input"]) + " " + s["target"] + "\n\n" for s in task.fewshot)
    return {"prompt": shots + task.prompt.format(input=example["input"])}



def summarise(task: Task, scored: list[bool]) -> float:
    return sum(scored) / len(scored) if scored else math.nan

