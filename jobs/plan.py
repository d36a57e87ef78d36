"""From a validated job to its resolved plan (pipelines.train.plan.RunPlan).

This is the one place where a job's settings turn into numbers: the layout, the batch
arithmetic, the sequence length, the budget in steps, the precision, the vocabulary of the
run's real tokenizer, the absolute paths and the DeepSpeed config of every training stage;
the data stage's DataPlan (pipelines/data/data_plan.py) and the eval stage's EvalPlan.
The driver calls it once and ships the result; `relaygpt plan` prints it. Below jobs/,
nothing sees the job itself.
"""

from __future__ import annotations

from pathlib import Path

from jobs.spec import ModelSpec
from model.errors import RelayError
from pipelines.data.data_plan import DataPlan
from pipelines.eval.settings import EvalPlan
from pipelines.rundir import EXPORT_NAMES, RunDir
from pipelines.train.plan import RunPlan, plan_training
from pipelines.train.tracking import resolve_tracking


def device_of(job) -> str:
    """The device training workers get: a GPU when the cluster section reserves one."""
    return "cuda" if job.cluster.gpus_per_worker > 0 else "cpu"


def resolve_plan(job, run_dir: RunDir, *, vocab_size: int | None = None, vocab_exact: bool = True,
                 device: str | None = None, hashes=None) -> RunPlan:
    """The job's plan for `run_dir`. `vocab_size` is the run's tokenizer size, from the tokenizer
    step where it ran (prepare_data; the driver after its data stage): then nothing is read but the
    config of an `init` model. Without it, the size is looked up (the prepared tokenizer when its
    inputs' fingerprint is current, else the one the job names, else a trained one's target);
    `hashes` (pipelines/inputs.FileHashes): the run's, so its files are hashed once a run; by
    default the run directory's cache, read and never written."""
    from pipelines.data.prepare import tokenizer_vocabulary

    data = data_plan(job)
    if vocab_size is None:  # the tokenizer step: the prepared tokenizer when current, else the named one or a target
        from pipelines.inputs import FileHashes

        vocab_size, vocab_exact = tokenizer_vocabulary(data, run_dir.tokenizer, hashes or FileHashes(run_dir.input_hashes))
    device = device or device_of(job)
    # The pipeline cut may move to fit a stated GPU memory (never the host's: the plan must not
    # depend on the machine it is resolved on).
    budget = job.cluster.device_memory_gb * 1024**3 if device == "cuda" and job.cluster.device_memory_gb else None
    training = {}
    for name in ("pretrain", "sft", "dpo"):
        settings = getattr(job.stages, name)
        if settings is None:
            continue
        init = _init_model(job, name, settings, run_dir)
        upstream = UPSTREAM.get(name)
        if not settings.init and upstream in training:
            model = training[upstream].model  # starts from the export of the stage above
        else:
            model = _model(name, settings, init, job.model if "model" in job.model_fields_set else None, vocab_size)
        seq_len = settings.seq_len or model.block_size if name == "pretrain" else {"sft": data.sft_seq_len, "dpo": data.dpo_seq_len}[name]
        if settings.init:  # the directory's architecture, checked here (the job file's model: section is not it)
            _check_init_fits(name, settings, model, seq_len)
        training[name] = plan_training(name, settings, model, world_size=job.cluster.num_workers, seq_len=seq_len, device=device,
                                       data_dir=run_dir.data(name), init_model=init, seed=job.seed, memory_budget=budget,
                                       separate_documents=_separate_documents(job, name))
    return RunPlan(job_name=job.name, seed=job.seed, run_dir=run_dir, vocab_size=vocab_size, vocab_exact=vocab_exact,
                   device=device, training=training, job=job.resolved_dict(),
                   tracking=resolve_tracking(job.tracking, job.name, run_dir.root), eval=eval_plan(job, run_dir), data=data)


def data_plan(job, fingerprint: str = "") -> DataPlan:
    """The data stage resolved (pipelines/data/data_plan.py): the job's tokenizer and data
    sections, its folder, seed and name, and the row lengths and pretraining window that other
    sections decide. Reads only the config.json of a stage's `init` model directory (its context
    is the default SFT / DPO row length); `fingerprint`: the data stage's input fingerprint."""
    pretrain = job.stages.pretrain
    return DataPlan(name=job.name, seed=job.seed, base_dir=Path(job.base_dir).absolute(), tokenizer=job.tokenizer, data=job.data,
                    sft_seq_len=_row_len(job, "sft") if job.data.sft is not None else None,
                    dpo_seq_len=_row_len(job, "dpo") if job.data.dpo is not None else None,
                    pretrain_window=(pretrain.seq_len or job.model.block_size) if pretrain is not None else None,
                    fingerprint=fingerprint)


def _row_len(job, name: str) -> int:
    """Length of a packed SFT row or of a preference row (one side of a pair): data.<name>.seq_len,
    default the context of the model the stage trains (its `init` model directory's, when it names one)."""
    if getattr(job.data, name).seq_len:
        return getattr(job.data, name).seq_len
    stage = getattr(job.stages, name)
    if stage is not None and stage.init:
        from model.export import read_model_config

        return read_model_config(job.path(stage.init)).block_size
    return job.model.block_size


def eval_plan(job, run_dir: RunDir) -> EvalPlan | None:
    """The eval stage resolved: its model directories and task files as absolute paths, its pool
    and its generation settings. Reads no file."""
    spec = job.stages.eval
    if spec is None:
        return None
    named = {name: run_dir.model(stage) for name, stage in EXPORT_NAMES.items()}
    return EvalPlan(models={m: named.get(m) or job.path(m) for m in spec.models},
                    tasks=tuple(eval_task_path(job, t) for t in spec.tasks), synthetic=job.data.synthetic, seed=job.seed,
                    limit=spec.limit, workers=spec.workers, cpus_per_worker=spec.cpus_per_worker,
                    gpus_per_worker=spec.gpus_per_worker, batch_size=spec.batch_size, temperature=spec.temperature,
                    system_prompt=spec.system_prompt, samples_in_report=spec.samples_in_report)


def eval_task_path(job, task: str) -> str:
    """A task as load_task takes it: a shipped name as written, a task file relative to the job file."""
    from pipelines.eval.task import TASK_DIR

    if task == "synthetic" or (TASK_DIR / f"{task}.yaml").exists():
        return task
    if task.startswith("harness:"):  # a harness registry name as written, a local harness task file from the job's folder
        rest = task[len("harness:"):]
        return task if not rest.endswith((".yaml", ".yml")) else "harness:" + str(job.path(rest))
    return str(job.path(task))


def _check_init_fits(name: str, settings, model, seq_len: int) -> None:
    field = f"data.{name}.seq_len" if name in ("sft", "dpo") else f"stages.{name}.seq_len"
    if seq_len > model.block_size:
        raise RelayError(f"{field}: {seq_len} exceeds the block_size {model.block_size} of the model stages.{name}.init "
                         f"({settings.init}) trains")
    pp = settings.deepspeed.pipeline_stages
    if pp > model.n_layer:
        raise RelayError(f"stages.{name}.deepspeed.pipeline_stages: {pp} stages but the model of stages.{name}.init "
                         f"({settings.init}) has {model.n_layer} layers (at most one stage per layer)")


UPSTREAM = {"sft": "pretrain", "dpo": "sft"}  # the stage whose export a stage starts from by default


def _separate_documents(job, name: str) -> bool:
    """data.<stage>.separate_documents (its defaults: on for SFT, off for pretraining; DPO rows hold one pair side each)."""
    if name == "dpo":
        return False
    section = getattr(job.data, name, None)
    return section.separate_documents if section is not None else name == "sft"


def _init_model(job, name: str, settings, run_dir: RunDir) -> Path | None:
    """The model directory a stage starts from: its `init`, by default the export of the stage
    above (SFT: pretrain; DPO: SFT, which is also DPO's frozen reference model)."""
    if settings.init:
        return job.path(settings.init).absolute()
    return run_dir.model(UPSTREAM[name]) if name in UPSTREAM else None


def _model(name: str, settings, init: Path | None, model_spec, vocab_size: int):
    """The stage's architecture: the job's model, or that of the model directory it starts from
    (its vocabulary grown to the tokenizer's: chat tokens a base model lacks get new rows).

    `model_spec` is the job's `model:` section, None when the job has none. A stage with an
    `init` takes the directory's architecture; a `model:` section that the job writes must then
    describe that same model, or the job is refused: it would otherwise be ignored in silence."""
    if init is None:
        return (model_spec or ModelSpec()).config(vocab_size)
    from model.export import read_model_config  # imports torch: only for a stage that starts from a model directory

    if not (init / "config.json").is_file():
        hint = "" if settings.init else f" (the job has no {UPSTREAM[name]} stage; set stages.{name}.init to a model directory)"
        raise RelayError(f"stages.{name}.init: no model directory at {init}{hint}")
    config = read_model_config(init)
    if model_spec is not None and settings.init:
        written = model_spec.config(config.vocab_size).to_dict()
        differ = [f"{key} {value!r} (model: says {written[key]!r})" for key, value in config.to_dict().items()
                  if key != "vocab_size" and value != written[key]]
        if differ:
            raise RelayError(f"stages.{name}.init: the model directory {init} has {', '.join(differ[:4])}; the stage trains the "
                             "directory's architecture, so make the model: section match it or remove the section")
    return config.replace(vocab_size=max(config.vocab_size, vocab_size))
