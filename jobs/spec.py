"""The job file: one YAML document describing a model, its tokenizer, data and stages.

Loaded with `yaml.safe_load` semantics (a composed node tree, so every problem can name its
file:line), overridden with `--set a.b.c=value`, validated by pydantic with unknown keys
refused (with a did-you-mean), and every problem reported at once. Relative paths in a job
file are relative to the job file's own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from model.config import PRESETS, GPTConfig
from model.errors import RelayError
from model.tokenizer import STANDARD_ENCODINGS


class JobError(RelayError):
    """Problems with a job file; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- tokenizer ---------------------------------------------------------------------------

class TrainTokenizerSpec(Strict):
    """A byte-level BPE trained on the pretraining text."""

    vocab_size: int = Field(ge=512, description="full vocabulary, special tokens included")
    max_chars: int = Field(20_000_000, ge=1, description="at most this much pretraining text is read for training")


class TokenizerSpec(Strict):
    """Exactly one of: a standard encoding, a .tiktoken file (+ sha256), a directory, or train."""

    encoding: str | None = None
    file: str | None = None
    sha256: str | None = None
    dir: str | None = None
    train: TrainTokenizerSpec | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value):
        if value is not None and value not in STANDARD_ENCODINGS:
            raise ValueError(f"unknown encoding {value!r}; valid: {', '.join(STANDARD_ENCODINGS)}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("encoding", "file", "dir", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of encoding, file, dir, train (got {', '.join(given) or 'none'})")
        if self.sha256 is not None and self.file is None:
            raise ValueError("sha256 applies to tokenizer.file only")
        return self


# ---- data --------------------------------------------------------------------------------

SFT_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response")


class SourceSpec(Strict):
    """One data source. `weight` scales how many of its documents enter the mix: 2.0 repeats
    every document twice, 0.5 keeps a deterministic half."""

    type: Literal["text", "json", "parquet", "csv", "hub", "synthetic"]
    path: str | None = Field(None, description="file or glob (text, json, parquet, csv)")
    field: str | None = Field(None, description="text field (pretraining from json/parquet/csv/hub); default 'text'")
    split_by: Literal["file", "blank_line"] = Field("file", description="text files: one document per file or per blank-line block")
    name: str | None = Field(None, description="hub dataset name")
    config: str | None = Field(None, description="hub dataset config")
    split: str = Field("train", description="hub dataset split")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_response"] = "auto"
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _needs(self):
        if self.type in ("text", "json", "parquet", "csv") and not self.path:
            raise ValueError(f"a {self.type} source needs 'path'")
        if self.type == "hub" and not self.name:
            raise ValueError("a hub source needs 'name' (the dataset name on the hub)")
        return self


class PretrainDataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="documents held out for validation (by document hash)")
    shard_tokens: int = Field(1 << 26, ge=1024, description="tokens per shard file")


class SFTDataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0, lt=0.5)
    seq_len: int | None = Field(None, ge=8, description="packed row length; default the model's block_size")


class SyntheticSpec(Strict):
    """The offline demo world (pipelines/data/synthetic.py)."""

    seed: int = 0
    num_people: int = Field(48, ge=4)
    held_out_fraction: float = Field(0.25, gt=0, lt=1)
    mentions_per_fact: int = Field(8, ge=1, description="how often pretraining states each fact, in varied phrasings")
    num_arithmetic: int = Field(300, ge=0)


class DataSpec(Strict):
    num_proc: int = Field(2, ge=1, description="processes for tokenization (datasets.map)")
    pretrain: PretrainDataSpec | None = None
    sft: SFTDataSpec | None = None
    synthetic: SyntheticSpec = SyntheticSpec()


# ---- model -------------------------------------------------------------------------------

_MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}


class ModelSpec(BaseModel):
    """A preset plus any GPTConfig field as an override (vocab_size comes from the tokenizer)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    preset: str = "tiny"

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value):
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; valid: {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _valid_config(self):
        extra = dict(self.model_extra or {})
        unknown = sorted(set(extra) - _MODEL_FIELDS)
        if unknown:
            raise ValueError("; ".join(f"unknown key {k!r}{_did_you_mean(k, _MODEL_FIELDS | {'preset'})}" for k in unknown))
        try:
            self.config(vocab_size=1024)
        except ValueError as exc:
            raise ValueError(str(exc).replace("model.", "")) from None
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **{**PRESETS[self.preset], **self.overrides})


# ---- the job -----------------------------------------------------------------------------

class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="names the run directory OUT/<name>/")
    seed: int = 1234
    output_dir: str = Field("runs", description="OUT: where run directories go (relative to the job file)")
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec
    data: DataSpec

    # Where the job file lives: relative paths in it resolve against this folder.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def run_dir(self, run_id: str = "default", output_dir: str | None = None) -> Path:
        """OUT/<name>/<run-id>: a stable id, so re-running a job reuses its completed stages."""
        return self.path(output_dir or self.output_dir) / self.name / run_id

    def resolved_dict(self) -> dict[str, Any]:
        """Every default filled in: what run directories record as job.yaml."""
        data = self.model_dump(mode="json")
        data["model"] = {"preset": self.model.preset, **self.model.overrides}
        return data


# ---- loading -----------------------------------------------------------------------------

def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line_map(node, path=(), out=None) -> dict[tuple, int]:
    """YAML path -> 1-based line of every mapping key and sequence item."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            out[child] = key.start_mark.line + 1
            _line_map(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _line_map(item, (*path, i), out)
    return out


def _fields_at(model: type[BaseModel], loc: tuple) -> set[str]:
    """Field names of the model that `loc` (a path into the job) points into."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return set()
        current = _unwrap(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        names = set(current.model_fields)
        return names | (_MODEL_FIELDS if current is ModelSpec else set())
    return set()


def _unwrap(annotation):
    """The BaseModel inside Optional[...] / list[...], or the annotation itself."""
    for arg in typing.get_args(annotation) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problems(exc: ValidationError, where: str, lines: dict[tuple, int]) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("list", "union"))))
        named = re.search(r"unknown key '([^']+)'", err["msg"])
        if named and (*loc, named.group(1)) in lines:  # a section's validator naming one of its keys
            loc = (*loc, named.group(1))
        line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
        prefix = f"{where}:{line}" if line else where
        field = _format_loc(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{_did_you_mean(str(loc[-1]), _fields_at(JobSpec, loc[:-1]))}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                msg += f" (got {err['input']!r})"[:120]
        problems.append(f"{prefix}: {field}: {msg}")
    return problems


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML; list items by index: sources.0.path)."""
    if "=" not in assignment:
        raise JobError([f"--set {assignment!r}: expected KEY=VALUE, e.g. data.num_proc=4"])
    key, raw = assignment.split("=", 1)
    parts = [int(p) if re.fullmatch(r"\d+", p) else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        try:
            if isinstance(part, int):
                node = node[part]
            else:
                node = node.setdefault(part, {})
        except (IndexError, KeyError, TypeError, AttributeError):
            raise JobError([f"--set {key}: {'.'.join(map(str, parts[: i + 1]))} does not exist in the job"]) from None
        if not isinstance(node, (dict, list)):
            raise JobError([f"--set {key}: {'.'.join(map(str, parts[: i + 1]))} is a value, not a section"])
    try:
        node[parts[-1]] = value
    except (IndexError, TypeError):
        raise JobError([f"--set {key}: {'.'.join(map(str, parts))} does not exist in the job"]) from None


def load_job(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read, override and validate a job file; JobError lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError([f"{path}: job file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError([f"{path}: cannot read the job file ({exc})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise JobError([f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    if not isinstance(data, dict):
        raise JobError([f"{path}: a job file is a YAML mapping (name:, model:, tokenizer:, data:, ...)"])
    lines = _line_map(node) if node is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(_problems(exc, str(path), lines)) from None
    job._base_dir = path.resolve().parent
    return job
