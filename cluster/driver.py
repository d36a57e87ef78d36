"""`relaygpt run`: the stages of a job, in order — each fingerprinted and resumable.

    data      tokenizer + token shards (Ray Data tasks on every node; in this process for an
              embedded run with one data worker)
    pretrain  workers running pipelines.train.train_stage: Ray Train, or local child processes
              (cluster.launcher; auto: local for one worker on an embedded run)
    sft       the same, from the pretrain export
    eval      a Ray Data pool of generation workers on the base and assistant exports

Ray starts when a stage first needs it (a joined cluster at once), so a one-worker embedded
run trains without starting Ray at all. The start-up before the first training step is
measured by phase (cluster/startup.py): one line when the step is done, and in summary.json.

Every stage writes RUN/<stage>/stage.json (status, fingerprint, timings, metrics). A re-run
skips a completed stage whose fingerprint (its settings, the contents of the files it read,
and everything upstream) is unchanged, and names the input file that changed when one did;
an interrupted stage starts over, or continues from its newest checkpoint with --resume;
--from-stage re-runs a stage and all after it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import yaml

from cluster.runtime import RayOnDemand
from cluster.startup import StartupClock
from jobs.fingerprints import fingerprints, stage_inputs
from model.atomic import write_json_atomically, write_text_atomically
from model.errors import RelayError, StageFailed
from pipelines.rundir import TRAINING_STAGES, RunDir


def stages_of(job) -> list[str]:
    present = ["data"]
    present += [s for s in ("pretrain", "sft", "dpo", "eval") if getattr(job.stages, s) is not None]
    return present


RERUN = {"data": "re-preparing", "pretrain": "retraining", "sft": "retraining", "dpo": "retraining", "eval": "re-evaluating"}


def _clear_stage(run_dir: RunDir, stage: str) -> None:
    if stage == "data":
        return  # data stages cache by their own fingerprints; nothing to throw away
    run_dir.remove(run_dir.stage(stage).root)  # refuses anything outside the run directory


@dataclass(frozen=True)
class RunOptions:
    """How `run_job` runs a job (the flags of `relaygpt run`).

    `show` takes relaygpt's lines; `live`, where given, the progress updates that a terminal
    redraws in place (training steps, generation rows); without it the training steps are lines
    (`progress`: follow them at all). `log_output` sends everything else this process and its
    children print (Ray, DeepSpeed, the workers' output) to RUN/logs/run.log once the job has
    passed preflight. `clock` times the start-up (from the run's start unless given): its
    phases are a line once the first training step is done, and `startup` in summary.json.
    """

    address: str | None = None  # --address; else cluster.address
    resume: bool = False
    from_stage: str | None = None
    show: Callable[[str], None] = print
    progress: bool = True
    live: Callable[[str | None], None] | None = None
    log_output: bool = False
    clock: StartupClock = field(default_factory=StartupClock)


@dataclass
class Driving:
    """What the stages of one `relaygpt run` share: the job, where relaygpt's lines go, the
    start-up clock, the training launcher, and Ray (started when a stage first needs it)."""

    job: Any
    show: Callable[[str], None]
    live: Callable[[str | None], None] | None  # a terminal's progress line, or None: steps as lines
    progress: bool  # follow the training stages' steps
    clock: StartupClock
    address: str | None  # --address or cluster.address
    embedded: bool  # no Ray cluster is joined: everything runs on this machine
    launcher: str  # of the training stages: "local" or "ray" (cluster/launch.py choose_launcher)
    ray: RayOnDemand | None = None


def run_job(job, run_dir: RunDir, options: RunOptions | None = None) -> dict:
    """Run every stage of `job` into `run_dir` as `options` say; returns the summary (also
    written to summary.json). A stage that fails on anything but a user error raises
    StageFailed: one line, and the run's log file.

    Ray starts when a stage first needs it: a cluster that is joined, at once; an embedded Ray
    for data preparation on Ray Data (more than one data worker, or cluster.launcher: ray),
    training on Ray Train, or the eval stage's generation pool.
    """
    from cluster.launch import choose_launcher
    from cluster.preflight import check_local_resources, preflight
    from cluster.runtime import check_reachable, joins_a_cluster

    o = options or RunOptions()
    if o.from_stage is not None and o.from_stage not in stages_of(job):
        raise RelayError(f"--from-stage: {o.from_stage!r} is not a stage of this job ({', '.join(stages_of(job))})")
    from pipelines.inputs import FileHashes

    hashes = FileHashes(run_dir.input_hashes)  # one per run: pre-flight and the fingerprints read each input file once
    run = preflight(job, run_dir, o.from_stage, hashes)
    address = o.address or job.cluster.address
    if address:
        check_reachable(address)
    embedded = not joins_a_cluster(address)
    launcher = choose_launcher(job.cluster, joins_a_cluster=not embedded)
    if embedded:
        check_local_resources(job, launcher)
    ctx = Driving(job, o.show, o.live, o.progress, o.clock, address, embedded, launcher)
    with run_dir.hold():  # one run per run directory; a user's folder there is refused before anything is written
        if o.log_output:
            from cluster.console import output_to

            o.show(f"[run] Ray, DeepSpeed and worker output: {run_dir.log_file}")
            with output_to(run_dir.log_file):
                return _run_stages(ctx, run, o.resume, o.from_stage, hashes)
        return _run_stages(ctx, run, o.resume, o.from_stage, hashes)


def _run_stages(ctx: Driving, run, resume: bool, from_stage, hashes) -> dict:
    from cluster.preflight import check_resources
    from pipelines.inputs import describe_change

    job, run_dir = ctx.job, run.run_dir
    write_text_atomically(run_dir.job_file, yaml.safe_dump(run.job, sort_keys=False))
    inputs = stage_inputs(job, hashes, run.data)
    hashes.save()
    prints = fingerprints(job, inputs)
    run = replace(run, data=replace(run.data, fingerprint=prints["data"]))
    started = time.time()
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    forced = set(stages_of(job)[stages_of(job).index(from_stage):]) if from_stage else set()
    c = job.cluster
    # An embedded Ray gets as many logical CPUs as the job asks for (training workers and the driver,
    # the data workers, or the generation pool), even beyond the machine's cores: oversubscribing is the user's call.
    ev = job.stages.eval
    wanted = max(c.num_workers * c.cpus_per_worker + 1, job.data.num_proc, ev.workers * ev.cpus_per_worker if ev else 0)
    with RayOnDemand(ctx.address, num_cpus=math.ceil(wanted), clock=ctx.clock, on_start=lambda: check_resources(job)) as ctx.ray:
        if not ctx.embedded:
            ctx.ray.ensure()  # a cluster is joined at once: what it lacks is said before any stage starts
        for stage in stages_of(job):
            status = run_dir.stage(stage).read_status()
            same = status.get("fingerprint") == prints[stage]
            if status.get("status") == "completed" and same and stage not in forced:
                ctx.show(f"[{stage}] up to date (fingerprint {prints[stage]}), skipped")
                results[stage] = status.get("result", {})
            else:
                change = describe_change(status.get("inputs"), inputs.get(stage, {})) if status.get("status") == "completed" else None
                if change:
                    ctx.show(f"[{stage}] input changed: {change}, {RERUN[stage]}")
                results[stage] = _run_recorded(ctx, run, stage, prints[stage], status, resume and same and stage not in forced,
                                               timings, inputs.get(stage, {}))
            if stage == "data" and not run.vocab_exact:  # the tokenizer now exists: plan with its real vocabulary
                from jobs.plan import resolve_plan

                vocab_size = results["data"].get("tokenizer", {}).get("n_vocab")  # known: not looked up (hashed) again
                run = replace(resolve_plan(job, run_dir, vocab_size=vocab_size, device=run.device), data=run.data)
    summary = _summary(job, run_dir, results, timings, time.time() - started)
    if ctx.clock.seconds or ctx.clock.first_step_seen:
        summary["startup"] = ctx.clock.record()
    write_json_atomically(run_dir.summary_file, summary)
    return summary


def _run_recorded(ctx: Driving, run, stage: str, fingerprint: str, status: dict, resume: bool, timings: dict,
                  inputs: dict[str, str]) -> dict:
    """Run one stage, recording it in its stage.json as running, then completed or failed (with the
    inputs it read, so that a re-run can say which one changed)."""
    run_dir = run.run_dir
    if status:
        if resume:
            ctx.show(f"[{stage}] resuming from its newest checkpoint")
        else:
            if status.get("status") != "completed" and status.get("fingerprint") == fingerprint:
                how = "failed last time" if status.get("status") == "failed" else "was interrupted"
                ctx.show(f"[{stage}] {how}; starting it over (--resume continues from its newest checkpoint)")
            _clear_stage(run_dir, stage)
    record = run_dir.stage(stage)
    running = record.begin(fingerprint, inputs)
    try:
        if stage == "data":
            result = _run_data(ctx, run)
        elif stage in TRAINING_STAGES:
            result = _run_training(ctx, run, stage)
        else:
            result = _run_eval(ctx, run.eval, run_dir)
    except BaseException as exc:
        record.fail(running, exc)
        if isinstance(exc, (RelayError, StageFailed)) or not isinstance(exc, Exception):
            raise
        raise _failure(run_dir, stage, exc) from exc
    timings[stage] = record.complete(running, result)
    return result


def _failure(run_dir: RunDir, stage: str, exc: Exception) -> StageFailed:
    """A stage's unexpected error as one line; its traceback goes to the run's log."""
    import traceback

    from cluster.failures import WorkerFailed, first_line

    log = run_dir.log_file
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n[{stage}] failed:\n" + "".join(traceback.format_exception(exc)))
    first = first_line(exc)
    what = first if isinstance(exc, WorkerFailed) else f"{type(exc).__name__}{': ' + first if first else ''}"
    return StageFailed(f"{stage} failed: {what}", str(log))


def _run_data(ctx: Driving, run) -> dict:
    """The tokenizer and the token shards: the blocks in this process (cluster/launch.py
    prepares_here: an embedded run with one data worker), else as Ray Data tasks on every node."""
    from cluster import launch
    from pipelines.data.prepare import validation_warning
    from pipelines.data.pretrain import run_blocks_here

    show = ctx.show
    here = launch.prepares_here(ctx.job, joins_a_cluster=not ctx.embedded)
    show(f"[data] tokenizer and token shards ({run.data.data.num_proc} worker(s){', in this process' if here else ''})")
    result = launch.prepare_run_data(run.data, run.run_dir, show=lambda line: show(f"[data] {line}"), timed=ctx.clock.phase,
                                     run_blocks=run_blocks_here if here else launch.blocks_on_ray(ctx.ray))
    show(f"[data] tokenizer {result['tokenizer']['name']} ({result['tokenizer']['n_vocab']} ids); "
         + "; ".join(f"{k}: train {v.get('train')} / val {v.get('val')} tokens{' (cached)' if v['cached'] else ''}"
                     for k, v in result.items() if k != "tokenizer"))
    for name, counts in result.items():
        warning = validation_warning(name, counts["train"], counts["val"]) if name != "tokenizer" else None
        if warning:
            show(f"[data] warning: {warning}")
    return result


def _run_training(ctx: Driving, run, stage: str) -> dict:
    """A training stage on the run's launcher, followed by the progress display. The first one
    this run starts is the one whose start-up is measured (its result gains `startup`)."""
    from cluster import launch
    from cluster.console import ProgressWatcher
    from cluster.local import train_locally

    plan, record = run.stage(stage), run.run_dir.stage(stage)
    split = (f" x tensor {plan.tensor_parallel}" if plan.tensor_parallel > 1 else "") + (
        f" x sequence {plan.sequence_parallel}" if plan.sequence_parallel > 1 else "")
    ctx.show(f"[{stage}] {plan.world_size} worker(s), data {plan.data_parallel}{split} x pipeline {plan.pipeline_stages}, "
             f"ZeRO-{plan.zero_stage}, {plan.precision}, {plan.total_steps} steps of {plan.tokens_per_step:,} tokens")
    record.startup.unlink(missing_ok=True)  # an earlier run's; rank 0 writes this one's at its first step
    if ctx.launcher == "ray":
        ctx.ray.ensure()
    measured = ctx.clock.launching(stage, ctx.launcher)
    first_step = (lambda marks: _first_step(ctx, marks)) if measured else None
    # Only lines of this attempt: a resumed stage's earlier history is already on record.
    watcher = ProgressWatcher(record.metrics.follow_from_end(), record.messages.follow_from_end(), ctx.show, ctx.live,
                              startup=record.startup if measured else None, on_startup=first_step) if ctx.progress else None
    try:
        if ctx.launcher == "local":
            train_locally(run, stage, ctx.job.cluster)
        else:
            launch.train_on_ray(run, stage, ctx.job.cluster)
    finally:
        if watcher:
            watcher.stop()
    result = record.result()
    if measured and not ctx.clock.first_step_seen and record.startup.exists():  # no watcher followed the stage
        _first_step(ctx, json.loads(record.startup.read_text()))
    if measured and ctx.clock.first_step_seen:
        result["startup"] = ctx.clock.stage_record()
    return result


def _first_step(ctx: Driving, marks: dict) -> None:
    """Rank 0 has done its first step: the start-up is complete, and said in one line."""
    ctx.clock.worker_marks(marks)
    ctx.show(ctx.clock.line())


def _run_eval(ctx: Driving, plan, run_dir: RunDir) -> dict:
    """The eval stage from its EvalPlan (pipelines/eval/settings.py) on a Ray Data pool: the
    entry `relaygpt eval` shares (cluster/evaluation.py)."""
    from cluster.evaluation import on_ray, run_eval

    ctx.show(f"[eval] {len(plan.models)} model(s) x {len(plan.tasks)} task(s) on {plan.workers} generation worker(s)")
    ctx.ray.ensure()
    metrics = run_eval(plan, run_dir.eval, on_ray(plan), live=ctx.live if ctx.progress else None)
    for model, scores in metrics.items():
        ctx.show(f"[eval] {model}: " + ", ".join(f"{t} {v:.3f}" for t, v in scores.items()))
    return {"scores": metrics}


def _summary(job, run_dir: RunDir, results: dict, timings: dict, total: float) -> dict:
    paths = {"run_dir": str(run_dir.root), "job": str(run_dir.job_file)}
    for stage in TRAINING_STAGES:
        if run_dir.model(stage).exists():
            paths[f"{stage}_model"] = str(run_dir.model(stage))
            paths[f"{stage}_tensorboard"] = str(run_dir.stage(stage).tensorboard)
    if run_dir.eval.report.exists():
        paths["eval_report"] = str(run_dir.eval.report)
    summary = {"job": job.name, "paths": paths, "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1)},
               "stages": {k: v for k, v in results.items() if k != "eval"}}
    from pipelines.accounting import Prices, account, stage_usage

    # What the run's artifacts cost: a stage skipped as up to date counts with the seconds it
    # took when it ran (its stage.json), so the figure does not depend on how often it was re-run.
    spent = {stage: timings.get(stage, run_dir.stage(stage).read_status().get("seconds")) for stage in stages_of(job)}
    prices = Prices(job.cluster.price_per_gpu_hour, job.cluster.price_per_core_hour)
    usages = [stage_usage(stage, seconds, job.cluster, job.stages.eval, job.data.num_proc)
              for stage, seconds in spent.items() if seconds is not None]
    summary["cost"] = account(usages, prices)
    if "eval" in results:
        summary["eval"] = results["eval"]["scores"]
    elif run_dir.eval.metrics.exists() and "eval" in stages_of(job):
        summary["eval"] = json.loads(run_dir.eval.metrics.read_text())
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"\ndone: {summary['job']} in {summary['seconds']['total']:.0f}s"]
    for key, value in summary["paths"].items():
        lines.append(f"  {key:<22} {value}")
    for model, scores in summary.get("eval", {}).items():
        lines.append(f"  eval {model:<17} " + ", ".join(f"{t} {v:.3f}" for t, v in scores.items()))
    if summary.get("cost"):
        from pipelines.accounting import describe_usage

        lines.append(f"  {'usage':<22} {describe_usage(summary['cost'])}")
    tb = summary["paths"].get("run_dir")
    lines.append(f"  tensorboard --logdir {tb} --host 127.0.0.1")
    return "\n".join(lines)
