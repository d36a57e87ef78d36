"""`relaygpt run`: the stages of a job, in order, on Ray — each fingerprinted and resumable.

    data      tokenizer + token shards (a Ray task)
    pretrain  Ray Train workers running pipelines.train.train_stage
    sft       the same, from the pretrain export
    eval      a Ray Data pool of generation workers on the base and assistant exports

Every stage writes RUN/<stage>/stage.json (status, fingerprint, timings, metrics). A re-run
skips a completed stage whose fingerprint (its settings and everything upstream) is
unchanged; an interrupted stage starts over, or continues from its newest checkpoint with
--resume; --from-stage re-runs a stage and all after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
import time
from pathlib import Path

import yaml

from model.errors import RelayError

STAGES = ("data", "pretrain", "sft", "eval")


def stages_of(job) -> list[str]:
    present = ["data"]
    present += [s for s in ("pretrain", "sft", "eval") if getattr(job.stages, s) is not None]
    return present


def fingerprints(job) -> dict[str, str]:
    """Each stage's fingerprint: its own settings chained with its upstream stage's."""
    def digest(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    d = job.resolved_dict()
    out = {"data": digest(d["tokenizer"], d["data"], d["seed"], d["model"].get("block_size"))}
    layout = d["cluster"]["num_workers"]
    out["pretrain"] = digest(out["data"], d["model"], d["stages"].get("pretrain"), layout)
    out["sft"] = digest(out["pretrain"], d["stages"].get("sft"), layout)
    out["eval"] = digest(out["sft"], d["stages"].get("eval"), d["data"]["synthetic"])
    return out


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def read_status(run_dir: Path, stage: str) -> dict:
    path = stage_dir(run_dir, stage) / "stage.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_status(run_dir: Path, stage: str, status: dict) -> None:
    from pipelines.files import write_text_atomically

    write_text_atomically(stage_dir(run_dir, stage) / "stage.json", json.dumps(status, indent=2, default=str) + "\n")


def _clear_stage(run_dir: Path, stage: str) -> None:
    if stage == "data":
        return  # data stages cache by their own fingerprints; nothing to throw away
    shutil.rmtree(stage_dir(run_dir, stage), ignore_errors=True)


def preflight(job) -> None:
    """The planner's checks and the inputs' existence; any problem stops the run before Ray starts."""
    from cluster.plan import plan_job

    _, problems = plan_job(job)
    problems += missing_inputs(job)
    if problems:
        raise RelayError(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def missing_inputs(job) -> list[str]:
    """Files the job names that are not there (data sources, tokenizer, init models, eval tasks)."""
    import glob

    problems = []
    for name in ("pretrain", "sft"):
        section = getattr(job.data, name)
        for i, source in enumerate(section.sources if section else []):
            if source.type in ("text", "json", "parquet", "csv") and not glob.glob(str(job.path(source.path)), recursive=True):
                problems.append(f"data.{name}.sources[{i}].path: no file matches {source.path!r} (looked for {job.path(source.path)})")
    tok = job.tokenizer
    for field in ("file", "dir"):
        value = getattr(tok, field)
        if value and not job.path(value).exists():
            problems.append(f"tokenizer.{field}: {job.path(value)} does not exist")
    for name in ("pretrain", "sft"):
        stage = getattr(job.stages, name)
        if stage is not None and stage.init and not job.path(stage.init).is_dir():
            problems.append(f"stages.{name}.init: model directory {job.path(stage.init)} does not exist")
    if job.stages.eval is not None:
        from pipelines.evaluate import TASK_DIR

        for i, task in enumerate(job.stages.eval.tasks):
            if task != "synthetic" and not (TASK_DIR / f"{task}.yaml").exists() and not job.path(task).exists():
                shipped = ", ".join(["synthetic", *sorted(p.stem for p in TASK_DIR.glob("*.yaml"))])
                problems.append(f"stages.eval.tasks[{i}]: {task!r} is neither a task file nor a shipped task ({shipped})")
        for i, model in enumerate(job.stages.eval.models):
            if model == "base" and job.stages.pretrain is None and not (job.run_dir() / "pretrain" / "model").exists():
                problems.append(f"stages.eval.models[{i}]: 'base' is the pretrain export, but the job has no pretrain stage")
            if model == "assistant" and job.stages.sft is None and not (job.run_dir() / "sft" / "model").exists():
                problems.append(f"stages.eval.models[{i}]: 'assistant' is the SFT export, but the job has no sft stage")
            if model not in ("base", "assistant") and not job.path(model).is_dir():
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


def run_job(job, run_dir: Path, *, address: str | None = None, resume: bool = False, from_stage: str | None = None,
            show=print, progress: bool = True) -> dict:
    """Run every stage of `job` into `run_dir`; returns the summary (also written to summary.json)."""
    from cluster.runtime import ray_session

    run_dir = Path(run_dir)
    if from_stage is not None and from_stage not in stages_of(job):
        raise RelayError(f"--from-stage: {from_stage!r} is not a stage of this job ({', '.join(stages_of(job))})")
    preflight(job)
    from cluster.runtime import check_reachable

    if address or job.cluster.address:
        check_reachable(address or job.cluster.address)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job.resolved_dict(), sort_keys=False))
    prints = fingerprints(job)
    started = time.time()
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    forced = set(stages_of(job)[stages_of(job).index(from_stage):]) if from_stage else set()
    c = job.cluster
    # An embedded Ray gets as many logical CPUs as the job asks for (training workers and the data
    # task, or the generation pool), even beyond the machine's cores: oversubscribing is the user's call.
    ev = job.stages.eval
    wanted = max(c.num_workers * c.cpus_per_worker + 1, ev.workers * ev.cpus_per_worker if ev else 0)
    with ray_session(address or c.address, num_cpus=math.ceil(wanted)):
        check_resources(job)
        for stage in stages_of(job):
            status = read_status(run_dir, stage)
            same = status.get("fingerprint") == prints[stage]
            if status.get("status") == "completed" and same and stage not in forced:
                show(f"[{stage}] up to date (fingerprint {prints[stage]}), skipped")
                results[stage] = status.get("result", {})
                continue
            if status:
                if resume and same and stage not in forced:
                    show(f"[{stage}] resuming from its newest checkpoint")
                else:
                    if status.get("status") != "completed" and same and stage not in forced:
                        show(f"[{stage}] was interrupted; starting it over (--resume continues from its newest checkpoint)")
                    _clear_stage(run_dir, stage)
            t0 = time.time()
            write_status(run_dir, stage, {"stage": stage, "status": "running", "fingerprint": prints[stage], "started": t0})
            try:
                results[stage] = _run_stage(job, stage, run_dir, show, progress)
            except BaseException as exc:
                write_status(run_dir, stage, {"stage": stage, "status": "failed", "fingerprint": prints[stage], "started": t0,
                                              "error": f"{type(exc).__name__}: {exc}"[:500]})
                raise
            timings[stage] = time.time() - t0
            write_status(run_dir, stage, {"stage": stage, "status": "completed", "fingerprint": prints[stage], "started": t0,
                                          "seconds": timings[stage], "result": results[stage]})
    summary = _summary(job, run_dir, results, timings, time.time() - started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _run_stage(job, stage: str, run_dir: Path, show, progress: bool) -> dict:
    from cluster import launch

    if stage == "data":
        show("[data] tokenizer and token shards")
        result = launch.prepare_on_ray(job, run_dir)
        show(f"[data] tokenizer {result['tokenizer']['name']} ({result['tokenizer']['n_vocab']} ids); "
             + "; ".join(f"{k}: train {v.get('train')} / val {v.get('val')} tokens{' (cached)' if v['cached'] else ''}"
                         for k, v in result.items() if k != "tokenizer"))
        return result
    if stage in ("pretrain", "sft"):
        spec = getattr(job.stages, stage)
        show(f"[{stage}] {job.cluster.num_workers} worker(s), pipeline {spec.deepspeed.pipeline_stages}, ZeRO-{spec.deepspeed.zero_stage}")
        watcher = ProgressWatcher(stage_dir(run_dir, stage) / "metrics.jsonl", show) if progress else None
        try:
            launch.train_on_ray(job, stage, run_dir)
        finally:
            if watcher:
                watcher.stop()
        return stage_result(stage_dir(run_dir, stage))
    from pipelines.evaluate import run_eval

    spec = job.stages.eval
    show(f"[eval] {len(spec.models)} model(s) x {len(spec.tasks)} task(s) on {spec.workers} generation worker(s)")

    def generate(model_dir, rows, params, chat):
        return launch.generate_on_ray(model_dir, rows, params, chat=chat, workers=spec.workers,
                                      cpus_per_worker=spec.cpus_per_worker, gpus_per_worker=spec.gpus_per_worker,
                                      batch_size=spec.batch_size)

    metrics = run_eval(job, run_dir, generate)
    for model, scores in metrics.items():
        show(f"[eval] {model}: " + ", ".join(f"{t} {v:.3f}" for t, v in scores.items()))
    return {"scores": metrics}


def stage_result(root: Path) -> dict:
    """A training stage's final result (result.json, written by rank 0 at the end), else its last logged metrics."""
    if (root / "result.json").exists():
        return json.loads((root / "result.json").read_text())
    last: dict = {}
    if (root / "metrics.jsonl").exists():
        for line in (root / "metrics.jsonl").read_text().splitlines():
            last.update(json.loads(line))
    return {k: v for k, v in last.items() if k not in ("time", "stage")}


def stage_usage(job, stage: str, seconds: float):
    """The resources a stage holds while it runs, for cost accounting."""
    from pipelines.accounting import Usage

    c = job.cluster
    if stage in ("pretrain", "sft"):
        return Usage(stage, seconds, c.num_workers, c.gpus_per_worker, c.cpus_per_worker)
    if stage == "eval":
        ev = job.stages.eval
        return Usage(stage, seconds, ev.workers, ev.gpus_per_worker, ev.cpus_per_worker)
    return Usage(stage, seconds, 1, 0.0, 1.0)  # data preparation: one Ray task on one CPU


def _summary(job, run_dir: Path, results: dict, timings: dict, total: float) -> dict:
    run_dir = Path(run_dir)
    paths = {"run_dir": str(run_dir.resolve()), "job": str(run_dir / "job.yaml")}
    for stage in ("pretrain", "sft"):
        if (run_dir / stage / "model").exists():
            paths[f"{stage}_model"] = str(run_dir / stage / "model")
            paths[f"{stage}_tensorboard"] = str(run_dir / stage / "tensorboard")
    if (run_dir / "eval" / "report.md").exists():
        paths["eval_report"] = str(run_dir / "eval" / "report.md")
    summary = {"job": job.name, "paths": paths, "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1)},
               "stages": {k: v for k, v in results.items() if k != "eval"}}
    from pipelines.accounting import Prices, account

    # What the run's artifacts cost: a stage skipped as up to date counts with the seconds it
    # took when it ran (its stage.json), so the figure does not depend on how often it was re-run.
    spent = {stage: timings.get(stage, read_status(run_dir, stage).get("seconds")) for stage in stages_of(job)}
    prices = Prices(job.cluster.price_per_gpu_hour, job.cluster.price_per_core_hour)
    summary["cost"] = account([stage_usage(job, stage, seconds) for stage, seconds in spent.items() if seconds is not None], prices)
    if "eval" in results:
        summary["eval"] = results["eval"]["scores"]
    else:
        previous = run_dir / "eval" / "metrics.json"
        if previous.exists() and "eval" in stages_of(job):
            summary["eval"] = json.loads(previous.read_text())
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


class ProgressWatcher:
    """Follows a stage's metrics.jsonl (written by rank 0) and shows step, loss, tokens/s, ETA."""

    def __init__(self, path: Path, show, interval: float = 0.5) -> None:
        self.path, self.show, self.interval = path, show, interval
        self._stop = threading.Event()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)
        self._poll()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            m = json.loads(line)
            parts = [f"[{m['stage']}] step {m['step']}/{m['total_steps']}"]
            if "train/loss" in m:
                parts.append(f"loss {m['train/loss']:.4f}  {m['perf/tokens_per_s']:.0f} tok/s  eta {m.get('eta_s', 0):.0f}s")
            if "val/loss" in m:
                parts.append(f"val loss {m['val/loss']:.4f}  bpb {m['val/bpb']:.3f}")
            self.show("  ".join(parts))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
