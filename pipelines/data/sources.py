"""Data sources: local text / JSON / JSONL / Parquet / CSV files, hub datasets, the demo world.

Every source becomes rows (pretraining: text documents; SFT: records in one of the chat
formats). Local text and JSON are read here, so that a malformed line is reported as
file:line and non-UTF-8 bytes are replaced and counted; Parquet, CSV and hub datasets come
from `datasets.load_dataset`. A source's `weight` repeats (2.0) or thins (0.5) its rows.
"""

from __future__ import annotations

import codecs
import glob
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import RelayError

REPLACEMENT = "\ufffd"


@dataclass
class SourceStats:
    """What reading the sources noticed, reported in the manifest."""

    replaced_bytes: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class Rows:
    """Rows of one source and where each came from (for file:line messages)."""

    rows: list
    where: list[str]


def _files(job, source) -> list[Path]:
    pattern = str(job.path(source.path))
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise RelayError(f"{source.path}: no file matches (looked for {pattern})")
    return matches


def read_text(path: Path, stats: SourceStats) -> str:
    """UTF-8 text with invalid bytes replaced by U+FFFD and counted."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    count = 0

    def handler(exc: UnicodeDecodeError):
        nonlocal count
        count += exc.end - exc.start
        return REPLACEMENT, exc.end

    name = f"relaygpt-count-{id(handler)}"
    codecs.register_error(name, handler)
    text = data.decode("utf-8", errors=name)
    stats.replaced_bytes += count
    return text


def _json_records(path: Path, stats: SourceStats) -> Rows:
    text = read_text(path, stats)
    if not text.strip():
        raise RelayError(f"{path}: the file is empty")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RelayError(f"{path}:{n}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
            where.append(f"{path}:{n}")
        return Rows(rows, where)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RelayError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise RelayError(f"{path}: expected a JSON array of records (or JSONL, one record per line)")
    return Rows(data, [f"{path} record {i}" for i in range(len(data))])


def _load_with_datasets(kind: str, source, job) -> Rows:
    import datasets

    datasets.disable_progress_bars()
    try:
        if kind == "hub":
            ds = datasets.load_dataset(source.name, source.config, split=source.split)
            label = f"hub dataset {source.name}"
        else:
            files = [str(p) for p in _files(job, source)]
            ds = datasets.load_dataset(kind, data_files=files, split="train")
            label = source.path
    except RelayError:
        raise
    except Exception as exc:
        if kind == "hub":
            raise RelayError(
                f"hub dataset {source.name!r} could not be loaded ({type(exc).__name__}); offline, download it where "
                "there is a network and point a json / parquet / csv source at the files (path: ...)"
            ) from None
        raise RelayError(f"{source.path}: cannot read as {kind} ({type(exc).__name__}: {str(exc)[:160]})") from None
    if len(ds) == 0:
        raise RelayError(f"{label}: the dataset is empty")
    return Rows(ds.to_list(), [f"{label} row {i}" for i in range(len(ds))])


def load_rows(source, job, stats: SourceStats, role: str) -> Rows:
    """Raw rows of one source, before weighting (role: "pretrain" | "sft")."""
    from pipelines.data import synthetic

    if source.type == "synthetic":
        spec = job.data.synthetic
        world = synthetic.build_world(spec.seed, spec.num_people, spec.held_out_fraction)
        if role == "pretrain":
            docs = synthetic.pretrain_documents(world, spec.seed, spec.mentions_per_fact, spec.num_arithmetic)
            return Rows([{"text": d} for d in docs], [f"synthetic document {i}" for i in range(len(docs))])
        convs = synthetic.sft_conversations(world, spec.seed)
        return Rows(convs, [f"synthetic conversation {i}" for i in range(len(convs))])
    if source.type == "text":
        rows, where = [], []
        for path in _files(job, source):
            stats.files.append(str(path))
            text = read_text(path, stats)
            if source.split_by == "file":
                blocks = [text] if text.strip() else []
            else:
                blocks = [b.strip() for b in _split_blank_lines(text) if b.strip()]
            rows += [{"text": b} for b in blocks]
            where += [str(path)] * len(blocks)
        if not rows:
            raise RelayError(f"{source.path}: the file is empty")
        return Rows(rows, where)
    if source.type == "json":
        out = Rows([], [])
        for path in _files(job, source):
            stats.files.append(str(path))
            part = _json_records(path, stats)
            out.rows += part.rows
            out.where += part.where
        if not out.rows:
            raise RelayError(f"{source.path}: the dataset is empty")
        return out
    if source.type in ("parquet", "csv"):
        stats.files += [str(p) for p in _files(job, source)]
    return _load_with_datasets(source.type, source, job)


def _split_blank_lines(text: str) -> list[str]:
    import re

    return re.split(r"\n[ \t\r\f\v]*\n", text)


def apply_weight(rows: Rows, weight: float, seed: int) -> Rows:
    """Repeat every row int(weight) times, plus a seeded fraction (weight % 1) of the rows."""
    whole, frac = int(weight), weight - int(weight)
    out_rows, out_where = rows.rows * whole, rows.where * whole
    if frac > 0:
        rng = random.Random(seed)
        keep = sorted(rng.sample(range(len(rows.rows)), k=max(1, round(frac * len(rows.rows)))))
        out_rows += [rows.rows[i] for i in keep]
        out_where += [rows.where[i] for i in keep]
    return Rows(out_rows, out_where)


def text_field(rows: Rows, source) -> list[str]:
    """The documents of a pretraining source (its `field`, default 'text')."""
    name = source.field or "text"
    docs = []
    for row, where in zip(rows.rows, rows.where):
        if not isinstance(row, dict) or name not in row:
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise RelayError(f"{where}: no field {name!r} (fields: {fields}); set 'field:' on the source")
        value = row[name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise RelayError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
        if value.strip():
            docs.append(value)
    if not docs:
        raise RelayError(f"{source.path or source.name or source.type}: the dataset is empty (no text in field {name!r})")
    return docs
