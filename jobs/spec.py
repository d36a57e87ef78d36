"""The job file: one YAML document describing a model, its tokenizer, data and stages.

Loaded with `yaml.safe_load` semantics (a composed node tree, so every problem can name its
file:line; a key written twice is refused, pipelines/yaml_file.py), overridden with `--set a.b.c=value`, validated by pydantic with unknown keys
refused (with a did-you-mean), and every problem reported at once. Relative paths in a job
file are relative to the job file's own folder.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from jobs.cluster import ClusterSpec
from jobs.job_file import JobError, apply_override, did_you_mean, line_map, override_path
from jobs.parallel_layout import sequence_parallel_problems, tensor_parallel_problems
from model.config import PRESETS, GPTConfig, architecture_problems
from model.errors import RelayError
from pipelines.data.config import DataSpec, TokenizerSpec
from pipelines.eval.settings import EvalStageSpec
from pipelines.settings import Strict
from pipelines.train.plan import data_parallel_size
from pipelines.train.settings import DPOStageSpec, TrainStageSpec
from pipelines.train.tracking import TrackingSpec
from pipelines.yaml_file import read_yaml


# ---- model -------------------------------------------------------------------------------

MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}


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
        unknown = sorted(set(extra) - MODEL_FIELDS)
        if unknown:
            raise ValueError("; ".join(f"unknown key {k!r}{did_you_mean(k, MODEL_FIELDS | {'preset'})}" for k in unknown))
        problems = architecture_problems(self.architecture)
        if problems:
            raise ValueError("; ".join(problems).replace("model.", ""))
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def architecture(self) -> dict[str, Any]:
        """The preset with the overrides applied: every GPTConfig field it sets (not vocab_size)."""
        return {**PRESETS[self.preset], **self.overrides}

    @property
    def block_size(self) -> int:
        return self.architecture.get("block_size", _DEFAULTS["block_size"])

    @property
    def n_layer(self) -> int:
        return self.architecture.get("n_layer", _DEFAULTS["n_layer"])

    def config(self, vocab_size: int) -> GPTConfig:
        """The model for a tokenizer of `vocab_size` ids (the run plan calls this with the real one)."""
        return GPTConfig(vocab_size=vocab_size, **self.architecture)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}


class StagesSpec(Strict):
    pretrain: TrainStageSpec | None = None
    sft: TrainStageSpec | None = None
    dpo: DPOStageSpec | None = None
    eval: EvalStageSpec | None = None


# ---- the job -----------------------------------------------------------------------------

SEED_MAX = 2**32 - 1

# A job's name and a run id each name one directory: letters, digits, '.', '_', '-', never a
# leading '.' or '-', so neither can be empty, '..', an absolute path or contain a '/'.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
NAME_RULE = "at most 100 letters, digits, '.', '_' and '-', starting with a letter or digit"


def check_run_id(run_id: str) -> str:
    """A run id names one directory under OUT/<name>/; anything else is refused (never joined)."""
    if not isinstance(run_id, str) or not re.fullmatch(NAME_PATTERN, run_id):
        shown = run_id if not isinstance(run_id, str) or len(run_id) <= 40 else run_id[:40] + f"... ({len(run_id)} characters)"
        raise RelayError(f"--run-id: {shown!r} is not a valid run id ({NAME_RULE}; it names the directory OUT/<name>/<run-id>/)")
    return run_id


class JobSpec(Strict):
    name: str = Field(description="names the run directory OUT/<name>/: " + NAME_RULE)
    seed: int = Field(1234, ge=0, le=SEED_MAX, description="0 to 2**32 - 1 (numpy's seed range; torch's is wider)")
    output_dir: str = Field("runs", description="OUT: where run directories go (relative to the job file)")
    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec
    data: DataSpec
    stages: StagesSpec = StagesSpec()
    cluster: ClusterSpec = ClusterSpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _directory_name(cls, value):
        if not re.fullmatch(NAME_PATTERN, value):
            shown = value if len(value) <= 40 else value[:40] + f"... ({len(value)} characters)"
            raise ValueError(f"{shown!r} cannot name a directory; use {NAME_RULE}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        """Cross-field checks, each naming its field; raised together as one error per line."""
        problems = []
        block_size, n_layer = self.model.block_size, self.model.n_layer
        for i, source in enumerate(self.data.pretrain.sources if self.data.pretrain else []):
            if source.fields is not None:
                problems.append(f"data.pretrain.sources.{i}.fields: maps instruction (data.sft) columns; a pretraining source "
                                "reads the one text column named by 'field'")
        # A stage that starts from a model directory trains that model: its context and layers are
        # checked against the directory in the plan (jobs/plan.py), not against the model: section.
        for name in ("sft", "dpo"):
            section, stage = getattr(self.data, name), getattr(self.stages, name)
            if section and section.seq_len and section.seq_len > block_size and not (stage is not None and stage.init):
                problems.append(f"data.{name}.seq_len: {section.seq_len} exceeds the model's block_size {block_size}")
        for name in ("pretrain", "sft", "dpo"):
            stage = getattr(self.stages, name)
            if stage is None:
                continue
            where, ds = f"stages.{name}", stage.deepspeed
            if getattr(self.data, name) is None:
                problems.append(f"{where}: needs a data.{name} section")
            pp, workers = ds.pipeline_stages, self.cluster.num_workers
            if pp > 1 and ds.zero_stage > 1:
                problems.append(f"{where}.deepspeed.zero_stage: ZeRO-{ds.zero_stage} cannot be combined with pipeline_stages {pp}; "
                                "DeepSpeed's pipeline engine supports ZeRO 0 and 1")
            if pp > n_layer and not stage.init:
                problems.append(f"{where}.deepspeed.pipeline_stages: {pp} stages but the model has {n_layer} layers (at most one stage per layer)")
            tp, sp = ds.tensor_parallel, ds.sequence_parallel
            problems += tensor_parallel_problems(where, stage, self.model.config(vocab_size=256))
            problems += sequence_parallel_problems(where, stage, self.model.config(vocab_size=256))
            if workers % (pp * tp * sp):
                problems.append(f"cluster.num_workers: {workers} workers is not a multiple of {where}.deepspeed.pipeline_stages ({pp})"
                                + (f" x tensor_parallel ({tp})" if tp > 1 else "") + (f" x sequence_parallel ({sp})" if sp > 1 else "")
                                + (f" = {pp * tp * sp}" if tp * sp > 1 else ""))
            elif stage.global_batch is not None:
                dp = data_parallel_size(workers, pp, tp, sp)
                if stage.global_batch != stage.micro_batch * stage.grad_accum * dp:
                    problems.append(f"{where}.global_batch: {stage.global_batch} != micro_batch {stage.micro_batch} x grad_accum "
                                    f"{stage.grad_accum} x data-parallel {dp} = {stage.micro_batch * stage.grad_accum * dp}")
            if stage.seq_len is not None and stage.seq_len > block_size and not stage.init:
                problems.append(f"{where}.seq_len: {stage.seq_len} exceeds the model's block_size {block_size}")
            problems += _row_stage_problems(name, stage)
            problems += _settings_that_would_do_nothing(where, stage, self.cluster)
            if not workers % (pp * tp * sp):
                problems += _extra_contradictions(where, stage, data_parallel_size(workers, pp, tp))
            checkpointing = stage.deepspeed.extra.get("checkpoint")
            if isinstance(checkpointing, dict) and checkpointing.get("load_universal"):
                problems.append(f"{where}.deepspeed.extra.checkpoint.load_universal: DeepSpeed reads universal checkpoints "
                                "with its own unpickler, which can run code from the files, and relaygpt writes none; "
                                "remove it (resume reads relaygpt's checkpoints as data)")
        if self.cluster.launcher == "local" and self.cluster.address:
            problems.append(f"cluster.launcher: local starts the training workers on this machine without Ray, but "
                            f"cluster.address names a Ray cluster ({self.cluster.address}); use auto or ray there")
        if self.cluster.device_memory_gb is not None and self.cluster.gpus_per_worker == 0:
            problems.append("cluster.device_memory_gb: the workers have no GPU (cluster.gpus_per_worker is 0), so there is no "
                            "device memory to check; remove it or reserve GPUs")
        if problems:
            raise ValueError("\n".join(problems))
        return self

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
        return self.path(output_dir or self.output_dir) / self.name / check_run_id(run_id)

    def resolved_dict(self) -> dict[str, Any]:
        """Every default filled in: what run directories record as job.yaml."""
        data = self.model_dump(mode="json")
        data["model"] = {"preset": self.model.preset, **self.model.overrides}
        return data


def _row_stage_problems(name: str, stage: TrainStageSpec) -> list[str]:
    """SFT and DPO make their rows at data.<stage>.seq_len; DPO needs each row's log-probability
    over the whole vocabulary, which the pipeline engine and tensor parallelism do not give."""
    where, ds, problems = f"stages.{name}", stage.deepspeed, []
    if name != "pretrain" and stage.seq_len is not None:
        problems.append(f"{where}.seq_len: {name} rows are made at data.{name}.seq_len; set that instead")
    if name == "dpo" and ds.pipeline_stages > 1:
        problems.append(f"{where}.deepspeed.pipeline_stages: DPO needs each row's log-probability of its answer, and DeepSpeed's "
                        "pipeline engine returns only one loss per batch from its last stage; use pipeline_stages 1 (ZeRO-3 and "
                        "LoRA hold a large model instead)")
    if name == "dpo" and ds.tensor_parallel > 1:
        problems.append(f"{where}.deepspeed.tensor_parallel: DPO sums each row's log-probabilities over the whole vocabulary's "
                        "softmax, and tensor parallelism splits the vocabulary over ranks; use tensor_parallel 1 (ZeRO-3 shards "
                        "a large model instead)")
    if name == "dpo" and ds.sequence_parallel > 1:
        problems.append(f"{where}.deepspeed.sequence_parallel: DPO sums each row's log-probabilities over the whole row, and "
                        "sequence parallelism gives each rank a chunk of it; use sequence_parallel 1")
    return problems


def _extra_contradictions(where: str, stage: TrainStageSpec, data_parallel: int) -> list[str]:
    """`deepspeed.extra` keys that would overrule a value the job derives from its own fields.
    DeepSpeed would take the extra value (it is merged in last) while the plan, the loaders and
    the step arithmetic keep the job's: the run would assert in a worker, or silently do
    something else. Each is refused, naming the key, the derived value and the field to set."""
    extra, ds = stage.deepspeed.extra, stage.deepspeed
    derived = {
        ("train_micro_batch_size_per_gpu",): (stage.micro_batch, "micro_batch"),
        ("gradient_accumulation_steps",): (stage.grad_accum, "grad_accum"),
        ("train_batch_size",): (stage.micro_batch * stage.grad_accum * data_parallel,
                                f"micro_batch x grad_accum x data-parallel {data_parallel}"),
        ("zero_optimization", "stage"): (ds.zero_stage, "deepspeed.zero_stage"),
        ("gradient_clipping",): (stage.optimizer.grad_clip, "optimizer.grad_clip"),
    }
    for name in ("bf16", "fp16"):  # the precision: auto decides per device, so any setting here contradicts it
        derived[(name, "enabled")] = (ds.precision == name, "deepspeed.precision")
    problems = []
    for keys, (value, field) in derived.items():
        node = extra
        for key in keys:
            node = node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT or (node == value and isinstance(node, bool) == isinstance(value, bool)):
            continue
        shown = f"deepspeed.precision {ds.precision!r}" if field == "deepspeed.precision" else f"{field} = {value}"
        problems.append(f"{where}.deepspeed.extra.{'.'.join(keys)}: {node!r} contradicts the job's {shown}; "
                        f"set {where}.{field.split(' ')[0]} instead (extra is for DeepSpeed settings the job does not derive)")
    return problems


_ABSENT = object()


def _settings_that_would_do_nothing(where: str, stage: TrainStageSpec, cluster: ClusterSpec) -> list[str]:
    """Combinations that would be accepted and silently ignored: refused, with the reason."""
    ds, problems = stage.deepspeed, []
    if ds.offload_optimizer and ds.zero_stage == 0:
        problems.append(f"{where}.deepspeed.offload_optimizer: offloading needs a ZeRO optimizer (zero_stage 1, 2 or 3); "
                        "with zero_stage 0 the optimizer states would stay where they are")
    if ds.pipeline_stages == 1 and ds.partition_method != type(ds).model_fields["partition_method"].default:
        problems.append(f"{where}.deepspeed.partition_method: applies to pipeline_stages > 1; with one stage there is nothing to partition")
    if ds.precision == "fp16" and cluster.gpus_per_worker == 0:
        problems.append(f"{where}.deepspeed.precision: fp16 (with loss scaling) runs on GPUs only; on CPU workers use bf16 or fp32")
    return problems


# ---- loading -----------------------------------------------------------------------------

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
        return names | (MODEL_FIELDS if current is ModelSpec else set())
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


def _names_a_field(msg: str, schema: type[BaseModel]) -> bool:
    """A cross-field validator's message that starts with the field it is about (`a.b.c: ...`,
    or a top-level field of `schema`), so the problem can name that field and its line."""
    m = re.match(r"Value error, ([a-z_]+)((\.[a-z_0-9]+)*): ", msg)
    return bool(m) and (bool(m.group(2)) or m.group(1) in schema.model_fields)


def _origin(loc: tuple, where: str, lines: dict[tuple, int], overridden: dict[tuple, str], shortest: int) -> str:
    """Where the value at `loc` came from: the `--set` that wrote it (or a section above it),
    else the file and the line of the nearest key written there."""
    for i in range(len(loc), 0, -1):
        if loc[:i] in overridden:
            shown = overridden[loc[:i]]
            return f"--set {shown if len(shown) <= 80 else shown[:80] + '...'}"
    line = next((lines[loc[:i]] for i in range(len(loc), shortest - 1, -1) if loc[:i] in lines), None)
    return f"{where}:{line}" if line else where


def validation_problems(exc: ValidationError, where: str, lines: dict[tuple, int], schema: type[BaseModel] | None = None,
                        overridden: dict[tuple, str] | None = None) -> list[str]:
    """One line per problem, each naming its field and where its value came from: file:line, or
    the `--set KEY=VALUE` (`overridden`: field path -> assignment) that gave it."""
    schema, overridden = schema or JobSpec, overridden or {}
    problems = []
    for err in exc.errors():
        if err["type"] == "value_error" and "\n" in err["msg"] or _names_a_field(err["msg"], schema):
            for line_msg in err["msg"].removeprefix("Value error, ").split("\n"):
                path, _, text = line_msg.partition(": ")
                loc = tuple(int(p) if p.isdigit() else p for p in path.split("."))
                problems.append(f"{_origin(loc, where, lines, overridden, 1)}: {path}: {text}")
            continue
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("list", "union"))))
        named = re.search(r"unknown key '([^']+)'", err["msg"])
        if named and ((*loc, named.group(1)) in lines or (*loc, named.group(1)) in overridden):  # a section's validator naming one of its keys
            loc = (*loc, named.group(1))
        prefix = _origin(loc, where, lines, overridden, 0)
        field = _format_loc(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{did_you_mean(str(loc[-1]), _fields_at(schema, loc[:-1]))}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                msg += f" (got {err['input']!r})"[:120]
        problems.append(f"{prefix}: {field}: {msg}")
    return problems


def load_job(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read, override and validate a job file; JobError lists every problem."""
    path = Path(path)
    try:
        data, node = read_yaml(path, "job file")
    except RelayError as exc:
        raise JobError([str(exc)]) from None
    if not isinstance(data, dict):
        raise JobError([f"{path}: a job file is a YAML mapping (name:, model:, tokenizer:, data:, ...)"])
    lines = line_map(node) if node is not None else {}
    overridden = {override_path(assignment): assignment for assignment in overrides}
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(validation_problems(exc, str(path), lines, overridden=overridden)) from None
    job._base_dir = path.resolve().parent
    return job
