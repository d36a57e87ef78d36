"""`relaygpt plan` and the pre-flight of `run` / `submit`: one check, before any worker starts.

`check(job, run_dir)` resolves the job's plan (jobs/plan.py) and collects every problem: inputs
that are not there, a plan that cannot be made, a pipeline stage that does not fit its device.
`relaygpt plan` prints the plan and the problems; `run` and `submit` refuse to start on any.
"""

from __future__ import annotations

import glob
import os

from model.errors import RelayError
from pipelines.rundir import TRAINING_STAGES
from pipelines.train.memory import GIB, stage_memory


def check(job, run_dir, from_stage: str | None = None, hashes=None) -> tuple[object | None, list[str]]:
    """(the RunPlan, or None when it cannot be made; every problem found). `from_stage`: the
    stages from it on are made again, so their old state in the run directory is not read.
    `hashes`: the run's file hashes (pipelines/inputs.FileHashes), shared with its fingerprints."""
    from jobs.plan import resolve_plan
    from pipelines.run_state import run_dir_problems

    order = ["data"] + [s for s in ("pretrain", "sft", "dpo", "eval") if getattr(job.stages, s) is not None]
    rerun = set(order[order.index(from_stage):]) if from_stage in order else set()
    from pipelines.train.tracking import missing_packages

    problems = run_dir_problems(run_dir.root, order[1:], rerun) + missing_inputs(job, run_dir) + _deepspeed_extra(job) \
        + missing_packages(job.tracking)
    from pipelines.inputs import FileHashes

    hashes = hashes or FileHashes(run_dir.input_hashes)  # `relaygpt plan`: the run's cache, read only; one for both lookups
    run = None
    if not problems:
        try:
            run = resolve_plan(job, run_dir, hashes=hashes)
        except RelayError as exc:
            problems.append(str(exc))
    if run is not None:
        problems += _init_tokenizers(job, run_dir, run.data, hashes)
    if job.stages.eval is not None:  # the eval stage's tasks and their data (the plan does not need them)
        problems += _eval_inputs(job, run_dir)
    if run is not None:
        budget = device_memory(job)
        for plan in run.training.values():
            for mem in stage_memory(plan) if budget is not None else ():
                if mem.total > budget:
                    problems.append(f"stages.{plan.stage}: pipeline stage {mem.stage} needs ~{mem.total / GIB:.1f} GiB per device, more "
                                    f"than the {budget / GIB:.0f} GiB available; raise pipeline_stages or zero_stage, enable activation "
                                    "checkpointing or offload, or lower micro_batch")
    return run, problems


def _init_tokenizers(job, run_dir, data, hashes=None) -> list[str]:
    """A stage's `init` model must use the job's tokenizer (its embedding rows are that
    tokenizer's ids). Checked where the job's tokenizer is known before preparing anything: named
    by the job, or already prepared; a tokenizer still to be trained is compared on rank 0."""
    from model.export import read_model_tokenizer
    from pipelines.data.prepare import known_tokenizer

    stages = [(name, getattr(job.stages, name)) for name in TRAINING_STAGES]
    stages = [(name, stage) for name, stage in stages if stage is not None and stage.init]
    if not stages:
        return []
    try:
        ours = known_tokenizer(data, run_dir.tokenizer, hashes)
    except RelayError as exc:
        return [str(exc)]
    problems = []
    for name, stage in stages if ours is not None else ():
        try:
            theirs = read_model_tokenizer(job.path(stage.init))
        except RelayError as exc:
            problems.append(f"stages.{name}.init: {exc}")
            continue
        if theirs.sha256 != ours.sha256:
            problems.append(f"stages.{name}.init: {job.path(stage.init)} uses tokenizer {theirs.name} ({theirs.sha256[:12]}), the job's "
                            f"is {ours.name} ({ours.sha256[:12]}); name the model's tokenizer in tokenizer: (e.g. dir: {stage.init})")
        elif theirs.chat_template_sha256 != ours.chat_template_sha256:
            has = lambda tok: "its own chat template" if tok.chat_template is not None else "relaygpt's chat template"
            problems.append(f"stages.{name}.init: {job.path(stage.init)} has {has(theirs)}, the job's tokenizer {has(ours)}; "
                            f"name the model's directory in tokenizer: (dir: {stage.init}) so its data and prompts render alike")
    return problems


def _deepspeed_extra(job) -> list[str]:
    """Keys of `deepspeed.extra` DeepSpeed does not know or refuses (before the plan renders them)."""
    from pipelines.train.deepspeed_keys import extra_problems

    problems = []
    for name in TRAINING_STAGES:
        stage = getattr(job.stages, name)
        if stage is not None:
            problems += extra_problems(f"stages.{name}.deepspeed.extra", stage.deepspeed.extra)
    return problems


def preflight(job, run_dir, from_stage: str | None = None, hashes=None):
    """The resolved plan, or a RelayError listing every problem (before Ray starts)."""
    run, problems = check(job, run_dir, from_stage, hashes)
    if problems:
        raise RelayError(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems))
    return run


def missing_inputs(job, run_dir) -> list[str]:
    """Files the plan needs that are not there (data sources, tokenizer, init models)."""
    problems = []
    for field in ("file", "dir"):
        value = getattr(job.tokenizer, field)
        path = job.path(value) if value else None
        if path is not None and path.exists() and path.is_dir() != (field == "dir"):
            problems.append(f"tokenizer.{field}: {path} is a {'directory' if path.is_dir() else 'file'}; tokenizer.{field} names a "
                            + ("directory holding tokenizer.json (relaygpt tokenizer train --out DIR)" if field == "dir" else
                               ".tiktoken rank file"))
    for name in TRAINING_STAGES:
        section = getattr(job.data, name)
        for i, source in enumerate(section.sources if section else []):
            if source.type in ("text", "json", "parquet", "csv") and not glob.glob(str(job.path(source.path)), recursive=True):
                problems.append(f"data.{name}.sources[{i}].path: no file matches {source.path!r} (looked for {job.path(source.path)})")
    for field in ("file", "dir"):
        value = getattr(job.tokenizer, field)
        if value and not job.path(value).exists():
            problems.append(f"tokenizer.{field}: {job.path(value)} does not exist")
    for name in TRAINING_STAGES:
        stage = getattr(job.stages, name)
        if stage is not None and stage.init and not job.path(stage.init).is_dir():
            problems.append(f"stages.{name}.init: model directory {job.path(stage.init)} does not exist")
    return problems


def _eval_inputs(job, run_dir) -> list[str]:
    from jobs.plan import eval_task_path
    from pipelines.eval.task import TASK_DIR, load_task

    problems = []
    for i, task in enumerate(job.stages.eval.tasks):
        if task.startswith("harness:"):  # lm_eval installed, a local task file present
            try:
                load_task(eval_task_path(job, task), synthetic=job.data.synthetic, limit=1)
            except RelayError as exc:
                problems.append(f"stages.eval.tasks[{i}]: {exc}")
            continue
        if task != "synthetic" and not (TASK_DIR / f"{task}.yaml").exists() and not job.path(task).exists():
            shipped = ", ".join(["synthetic", *sorted(p.stem for p in TASK_DIR.glob("*.yaml"))])
            problems.append(f"stages.eval.tasks[{i}]: {task!r} is neither a task file nor a shipped task ({shipped})")
            continue
        try:  # its data too (a hub dataset the workers could not load would fail after the training)
            load_task(eval_task_path(job, task), synthetic=job.data.synthetic, limit=1)
        except RelayError as exc:
            problems.append(f"stages.eval.tasks[{i}]: {exc}")
    for i, model in enumerate(job.stages.eval.models):
        if model == "base" and job.stages.pretrain is None and not run_dir.model("pretrain").exists():
            problems.append(f"stages.eval.models[{i}]: 'base' is the pretrain export, but the job has no pretrain stage")
        if model == "assistant" and job.stages.sft is None and not run_dir.model("sft").exists():
            problems.append(f"stages.eval.models[{i}]: 'assistant' is the SFT export, but the job has no sft stage")
        if model == "dpo" and job.stages.dpo is None and not run_dir.model("dpo").exists():
            problems.append(f"stages.eval.models[{i}]: 'dpo' is the DPO export, but the job has no dpo stage")
        if model not in ("base", "assistant", "dpo") and not job.path(model).is_dir():
            problems.append(f"stages.eval.models[{i}]: model directory {job.path(model)} does not exist")
    return problems


def cluster_problems(job) -> list[str]:
    """Connect to the job's cluster and report what it lacks (empty when it has enough)."""
    from cluster.runtime import check_reachable, ray_session

    try:
        check_reachable(job.cluster.address)
        with ray_session(job.cluster.address):
            check_resources(job)
    except RelayError as exc:
        return [str(exc)]
    return []


def check_resources(job) -> None:
    """The connected Ray cluster holds the job's training workers and generation pool."""
    from cluster.runtime import cluster_resources

    have = cluster_resources()
    c = job.cluster
    need_gpu = c.num_workers * c.gpus_per_worker
    if need_gpu > have.get("GPU", 0):
        raise RelayError(f"cluster.gpus_per_worker: the job needs {need_gpu:g} GPUs ({c.num_workers} workers x {c.gpus_per_worker:g}) "
                         f"but the Ray cluster has {have.get('GPU', 0):g}")
    need_cpu = c.num_workers * c.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise RelayError(f"cluster.cpus_per_worker: the job needs {need_cpu:g} CPUs ({c.num_workers} workers x {c.cpus_per_worker:g}) "
                         f"but the Ray cluster has {have.get('CPU', 0):g}")
    ev = job.stages.eval
    if ev is not None:
        for kind, per_worker in (("CPU", ev.cpus_per_worker), ("GPU", ev.gpus_per_worker)):
            need = ev.workers * per_worker
            if need > have.get(kind, 0):
                raise RelayError(f"stages.eval.workers: {ev.workers} generation workers x {per_worker:g} {kind} need {need:g} {kind}s "
                                 f"but the Ray cluster has {have.get(kind, 0):g}")


def check_local_resources(job, launcher: str) -> None:
    """An embedded run: this machine has the GPUs the job reserves (its CPUs are the job's to
    oversubscribe: an embedded Ray gets as many logical CPUs as asked). Local ranks each take
    the GPU of their local rank, so they need one each."""
    c, ev = job.cluster, job.stages.eval
    training = c.num_workers * c.gpus_per_worker
    if launcher == "local" and c.gpus_per_worker:
        training = max(training, c.num_workers)
    pool = ev.workers * ev.gpus_per_worker if ev is not None else 0
    if not training and not pool:
        return
    have = local_gpu_count()
    if training > have:
        raise RelayError(f"cluster.gpus_per_worker: the job needs {training:g} GPUs ({c.num_workers} workers x {c.gpus_per_worker:g}"
                         f"{', one each for local workers' if launcher == 'local' else ''}) but this machine has {have}")
    if pool > have:
        raise RelayError(f"stages.eval.workers: {ev.workers} generation workers x {ev.gpus_per_worker:g} GPU need {pool:g} GPUs "
                         f"but this machine has {have}")


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def device_memory(job) -> float | None:
    """Bytes one worker may use: cluster.device_memory_gb on GPUs; on an embedded CPU run, the host's share."""
    cluster = job.cluster
    if cluster.gpus_per_worker > 0:
        return cluster.device_memory_gb * GIB if cluster.device_memory_gb else None
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return host / max(1, cluster.num_workers) if not cluster.address else None


def format_plan(job, run, problems: list[str]) -> str:
    """What `relaygpt plan` prints: the cluster, each training stage's resolved numbers and memory, the problems."""
    c = job.cluster
    lines = [f"job {job.name}: {c.num_workers} worker(s) x {c.cpus_per_worker:g} CPU" + (f" + {c.gpus_per_worker:g} GPU" if c.gpus_per_worker else "")
             + f", placement {c.placement}, {'Ray at ' + c.address if c.address else 'embedded'}, {_launcher_note(job)}"]
    if run is not None:
        vocab = f"{run.vocab_size}" + ("" if run.vocab_exact else " (the trained tokenizer's target; a small corpus may give fewer)")
        lines.append(f"run directory {run.run_dir.root}; vocabulary {vocab}; {run.device} workers")
        for p in run.training.values():
            lines += _format_stage(p)
    budget = device_memory(job)
    lines.append(f"\ndevice memory: {budget / GIB:.1f} GiB per worker" if budget else
                 "\ndevice memory: unknown (set cluster.device_memory_gb to check GPU fit)")
    lines.append("problems:\n  " + "\n  ".join(problems) if problems else "no problems found")
    return "\n".join(lines)


def _launcher_note(job) -> str:
    """What starts the training workers when the job runs as written (no --address)."""
    from cluster.launch import choose_launcher

    try:
        launcher = choose_launcher(job.cluster, joins_a_cluster=bool(job.cluster.address))
    except RelayError:
        return f"launcher {job.cluster.launcher}"  # refused, and said so among the problems
    how = "local processes, no Ray" if launcher == "local" else "Ray Train"
    return f"training on {how} (launcher {job.cluster.launcher})"


def _format_stage(p) -> list[str]:
    m = p.model
    tensor = (f" x tensor {p.tensor_parallel}" if p.tensor_parallel > 1 else "") + (
        f" x sequence {p.sequence_parallel}" if p.sequence_parallel > 1 else "")
    lines = [f"\n[{p.stage}] data {p.data_parallel}{tensor} x pipe {p.pipeline_stages}  (ZeRO-{p.zero_stage}, {p.precision}); "
             f"model {m.num_params() / 1e6:.1f}M parameters, {m.n_layer} layers, vocabulary {m.vocab_size}"
             + (f", from {p.init_model}" if p.init_model else ""),
             f"  global batch {p.global_batch} = micro {p.micro_batch} x accum {p.grad_accum} x data-parallel {p.data_parallel}"
             f"; {p.tokens_per_step:,} tokens/step ({p.seq_len} per sequence) x {p.total_steps} steps = {p.total_tokens:,} tokens"]
    lines += [f"  engine: {note}" for note in p.engine_notes]
    if hasattr(p.settings, "beta"):
        s = p.settings
        lines.append(f"  dpo: loss {s.loss}, beta {s.beta}" + (f", label smoothing {s.label_smoothing}" if s.label_smoothing else "")
                     + f"; micro batch {p.micro_batch} pairs = {2 * p.micro_batch} rows. Reference: the starting model, frozen; its "
                     "log-probabilities of every prepared pair are computed once, at the start of the stage (one forward per pair), "
                     "and cached in RUN/dpo/reference/ (no second model is held while training)")
    if p.partition_note:
        lines.append(f"  pipeline cut: {p.partition_note}")
    if p.pipeline_stages > 1:
        bubble = (p.grad_accum + p.pipeline_stages - 1) / p.grad_accum
        lines.append(f"  1F1B with {p.grad_accum} micro-batches: ideal bubble (m + p - 1)/m = {bubble:.2f}x")
    lines.append("  stage  blocks   params   FLOP/step   weights   grads   optimizer  buffers  activations  logits   total")
    for s in stage_memory(p):
        lines.append(f"  {s.stage:>5}  {s.layers:>6}  {s.params / 1e6:>7.1f}M  {_si(s.flops_per_step):>9}  {s.weights / GIB:>8.2f}  "
                     f"{s.gradients / GIB:>6.2f}  {s.optimizer / GIB:>9.2f}  {s.buffers / GIB:>7.2f}  {s.activations / GIB:>11.2f}  {s.logits / GIB:>6.2f}  "
                     f"{s.total / GIB:>6.2f} GiB")
    return lines


def _si(value: float) -> str:
    """4.2 G, 647 T: a count with its SI prefix, three significant figures."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"
