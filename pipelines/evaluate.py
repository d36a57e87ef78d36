"""Evaluation tasks, scoring, the generation worker and the report.

A task is a YAML file (shipped ones live in pipelines/eval_tasks/, any other path works too):

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
`GenerationWorker` is what every Ray Data actor runs: it loads a model directory once and
answers batches of rows; nothing in this module imports Ray.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.errors import RelayError

TASK_DIR = Path(__file__).with_name("eval_tasks")
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


# ---- the worker ---------------------------------------------------------------------------

class GenerationWorker:
    """Loads a model directory once; turns batches of rows into completions (a Ray Data actor)."""

    def __init__(self, model_dir: str, params: dict, chat: bool, batch_size: int = 16, threads: int | None = None) -> None:
        import torch

        from model.export import load_model_dir
        from model.generate import SamplingParams, prepare_for_inference

        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer, _ = load_model_dir(model_dir)
        prepare_for_inference(self.model)
        self.params = SamplingParams(**params)
        self.chat, self.batch_size = chat, batch_size

    def generate_rows(self, rows: list[dict]) -> list[dict]:
        from pipelines.generation import complete_rows

        return complete_rows(self.model, self.tokenizer, rows, self.params, chat=self.chat, batch_size=self.batch_size)

    def __call__(self, batch: dict) -> dict:
        """A Ray Data batch of {"_index", "_row" (JSON)} -> {"_index", "_result" (JSON)}."""
        indices = [int(i) for i in _plain(batch["_index"])]
        rows = [json.loads(r) for r in _plain(batch["_row"])]
        done = self.generate_rows(rows)
        return {"_index": indices, "_result": [json.dumps(d, ensure_ascii=False) for d in done]}


def _plain(value):
    """numpy scalars / arrays from Ray Data back to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# ---- the report ---------------------------------------------------------------------------

def apply_stops(text: str, stops: list[str]) -> str:
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def write_report(out: Path, metrics: dict, predictions: list[dict], samples: int = 3) -> None:
    models = list(metrics)
    tasks = sorted({t for m in metrics.values() for t in m})
    lines = ["# Evaluation", "", "| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{metrics[m].get(task, float('nan')):.3f}" for m in models) + " |")
    lines += ["", "Scores are exact match (after normalisation) or accuracy; bits per byte for `bpb` tasks.", ""]
    for task in tasks:
        lines += [f"## Sample answers: {task}", ""]
        for model in models:
            rows = [p for p in predictions if p["task"] == task and p["model"] == model][:samples]
            for p in rows:
                mark = "✓" if p.get("correct") else "✗"
                lines.append(f"- **{model}** {mark} `{_short(p['input'])}` → `{_short(p['prediction'])}` (reference `{_short(p['reference'])}`)")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _short(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


def bits_per_byte_of_texts(model_dir: str, texts: list[str], threads: int | None = None) -> float:
    """Bits per byte of `texts` under a model: each text scored on its own, in windows of the
    context length, every token predicted from the tokens before it in its window."""
    import torch

    from model.export import load_model_dir
    from model.gpt import lm_loss
    from pipelines.metrics import bits_per_byte

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, _ = load_model_dir(model_dir)
    window = model.config.block_size
    nats, nbytes = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = [tokenizer.eot_id] + tokenizer.encode(text)  # end-of-text stands for the document start
            nbytes += len(text.encode("utf-8"))
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start : start + window + 1])[None]
                if chunk.size(1) < 2:
                    break
                logits, _ = model(chunk[:, :-1])
                nats += float(lm_loss(logits, chunk[:, 1:])) * (chunk.size(1) - 1)
    return bits_per_byte(nats, nbytes)


def summarise(task: Task, scored: list[bool]) -> float:
    return sum(scored) / len(scored) if scored else math.nan


# ---- the eval stage -----------------------------------------------------------------------

def model_dirs(job, run_dir: Path) -> dict[str, Path]:
    """base -> the pretrain export, assistant -> the SFT export, anything else: a model directory."""
    named = {"base": Path(run_dir) / "pretrain" / "model", "assistant": Path(run_dir) / "sft" / "model"}
    return {m: named.get(m) or job.path(m) for m in job.stages.eval.models}


def run_eval(job, run_dir: Path, generate) -> dict:
    """Evaluate every model on every task; writes RUN/eval/ and returns {model: {task: score}}.

    `generate(model_dir, rows, params, chat)` returns one result per row, in order: the Ray
    Data worker pool in a job, or in-process generation.
    """
    from model.chat import strip_reply
    from pipelines.metrics import Board

    spec = job.stages.eval
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tasks = [load_task(t, job=job, limit=spec.limit) for t in spec.tasks]
    metrics: dict[str, dict[str, float]] = {}
    predictions: list[dict] = []
    for model, model_dir in model_dirs(job, run_dir).items():
        if not Path(model_dir).is_dir():
            raise RelayError(f"stages.eval.models: {model} has no model directory at {model_dir}")
        metrics[model] = {}
        for task in tasks:
            if task.metric == "bpb":  # no generation: the likelihood of held-out text
                metrics[model][task.name] = bits_per_byte_of_texts(str(model_dir), [ex["target"] for ex in task.examples])
                continue
            rows = [render_prompt(task, ex) for ex in task.examples]
            params = {"max_new_tokens": task.max_new_tokens, "temperature": spec.temperature, "seed": job.seed}
            results = generate(str(model_dir), rows, params, task.style == "chat")
            scored = []
            for ex, res in zip(task.examples, results):
                text = apply_stops(res["completion"], task.stop)
                text = strip_reply(text) if task.style == "chat" else text
                correct = score(task.metric, text, ex["target"])
                scored.append(correct)
                predictions.append({"model": model, "task": task.name, "input": ex["input"], "reference": ex["target"],
                                    "prediction": text, "correct": correct, "finish_reason": res["finish_reason"]})
            metrics[model][task.name] = summarise(task, scored)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out, metrics, predictions, spec.samples_in_report)
    board = Board(out / "tensorboard")
    for model, scores in metrics.items():
        board.scalars(0, {f"eval/{model}/{task}": value for task, value in scores.items()})
        board.text(f"eval/{model}/samples", "\n\n".join(f"{p['input']} -> {p['prediction']} (ref {p['reference']})"
                                                       for p in predictions if p["model"] == model)[:4000])
    board.close()
    return metrics
