"""Placing the stages' work: data preparation on Ray Data (or in this process), training on Ray
Train (or on local processes, cluster/local.py), generation on a Ray Data actor pool. The work
itself lives in pipelines/; this module only places it.

Multi-node runs need the run directory on a filesystem every node sees (checkpoints, data
shards and exports are read and written by whichever node a worker lands on).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

from cluster.failures import WorkerFailed, find_cause, first_worker_failure
from model.errors import RelayError

WINDOW_BLOCKS = 4096  # blocks handed to one Ray Data execution
WINDOW_INLINE_BYTES = 256 << 20  # records carried inline (streamed from the hub) per execution


def prepare_run_data(data, run_dir, show=None, *, run_blocks=None, timed=None) -> dict:
    """Tokenizer and data preparation of `run_dir` (a RunDir) from `data`, the job's DataPlan: planned on this driver, the
    pretraining blocks tokenized by `run_blocks` (default: Ray Data tasks on every node);
    returns the manifests' counts. `timed(phase)` times the tokenizer and the data apart."""
    from pipelines.data.prepare import prepare_data

    out = prepare_data(data, run_dir, run_blocks=run_blocks or run_blocks_on_ray, show=show, timed=timed)
    tok = out.pop("tokenizer")
    return {"tokenizer": {**tok.identity, "n_vocab": tok.n_vocab},
            **{stage: {"cached": m["cached"], **{name: split.get("tokens") for name, split in m["splits"].items()}}
               for stage, m in out.items()}}


def prepares_here(job, *, joins_a_cluster: bool) -> bool:
    """Whether the pretraining blocks run in this process: on an embedded run with one data
    worker, where Ray Data would run the same function as one task after starting Ray (the
    shards are the same bytes), unless the job asks for Ray (cluster.launcher: ray)."""
    return not joins_a_cluster and job.data.num_proc == 1 and job.cluster.launcher != "ray"


@contextmanager
def blocks_runner(job):
    """A `run_blocks` for prepare_data outside `relaygpt run` (data prepare, data inspect): this
    process where `prepares_here`, else Ray Data on `cluster.address` (or RAY_ADDRESS, or an
    embedded Ray of `data.num_proc` CPUs) started the first time there are blocks to run and
    left at the end: a command whose data is up to date, or that has only SFT data, starts no Ray."""
    from cluster.runtime import RayOnDemand, joins_a_cluster
    from pipelines.data.pretrain import run_blocks_here

    if prepares_here(job, joins_a_cluster=joins_a_cluster(job.cluster.address)):
        yield run_blocks_here
        return
    with RayOnDemand(job.cluster.address, num_cpus=job.data.num_proc) as ray:
        yield blocks_on_ray(ray)


def blocks_on_ray(ray):
    """A `run_blocks` that starts `ray` (a RayOnDemand) when it is first given blocks."""
    def run_blocks(blocks, work, workers):
        ray.ensure()
        return run_blocks_on_ray(blocks, work, workers)

    return run_blocks


def run_blocks_on_ray(blocks, work, workers: int):
    """Preparation blocks on Ray Data: one task of one CPU per block, at most `workers` at a time,
    on any node; results as blocks finish. A user error in a block stops preparation with its message."""
    for window in _windows(blocks):
        yield from _run_window(window, work, workers)


def _windows(blocks):
    """Blocks serialised, in runs small enough for one execution (records from the hub ride inline)."""
    window, size = [], 0
    for block in blocks:
        item = json.dumps(block)
        window.append({"block": item})
        size += len(item)
        if len(window) >= WINDOW_BLOCKS or size >= WINDOW_INLINE_BYTES:
            yield window
            window, size = [], 0
    if window:
        yield window


def _run_window(items: list[dict], work, workers: int):
    import ray.data

    with _quiet_ray_data():
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        results = ds.map_batches(_run_block, fn_kwargs={"work": work}, batch_size=1,
                                 compute=ray.data.TaskPoolStrategy(size=min(workers, len(items))), num_cpus=1)
        for row in results.iter_rows():
            result = json.loads(row["result"])
            if "error" in result:
                raise RelayError(result["error"])
            yield result


def _run_block(batch, work):
    """A Ray Data task: the work of each block of the batch (one), with the node it ran on."""
    import numpy as np
    import ray

    out = []
    for item in batch["block"]:
        try:
            result = work(json.loads(item))
        except RelayError as exc:  # a user error travels back as data, to be raised on the driver as one line
            result = {"error": str(exc)}
        out.append(json.dumps({**result, "node": ray.get_runtime_context().get_node_id()}))
    return {"result": np.asarray(out, dtype=object)}


@contextmanager
def _quiet_ray_data():
    """Ray Data's own lines (execution start and end, progress bars) go to its log file in the
    Ray session's logs, not to the terminal; the driver prints its own progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in consoles]
    for handler in consoles:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)


def choose_launcher(cluster, *, joins_a_cluster: bool) -> str:
    """What starts a run's training workers, "local" or "ray", from `cluster.launcher` (the job's
    cluster settings): auto is local for one worker on an embedded run, where Ray Train would
    only add Ray's start and its worker start to the same single process."""
    if cluster.launcher == "local" and joins_a_cluster:
        raise RelayError("cluster.launcher: local starts the training workers on this machine without Ray, but this run "
                         "joins a Ray cluster (--address, cluster.address or RAY_ADDRESS); use auto or ray")
    if cluster.launcher == "auto":
        return "local" if cluster.num_workers == 1 and not joins_a_cluster else "ray"
    return cluster.launcher


def _train_loop(config: dict) -> None:
    """What every Ray Train worker runs: the same function torchrun runs, on the driver's plan."""
    import ray
    import ray.train

    from pipelines.train.entry import train_stage

    run, stage = config["run"], config["stage"]
    record_where(run.run_dir.stage(stage), ray.train.get_context().get_world_rank(), ray.get_runtime_context().get_node_id())
    train_stage(run, stage, console=False)


def record_where(stage_dir, rank: int, node_id: str) -> None:
    """Where a training rank runs (node, host, pid), in RUN/<stage>/workers/rank_N.json: for
    placement checks and debugging."""
    import os
    import socket

    stage_dir.workers.mkdir(parents=True, exist_ok=True)
    (stage_dir.workers / f"rank_{rank}.json").write_text(json.dumps({
        "rank": rank, "node_id": node_id, "host": socket.gethostname(), "pid": os.getpid()}))


def train_on_ray(run, stage: str, cluster) -> None:
    """A training stage of the resolved run `run` as a Ray Train TorchTrainer on the workers that
    `cluster` (the job's cluster settings) describes; restarts failed workers up to max_failures."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = run.stage(stage)
    use_gpu = plan.device == "cuda"
    resources = {"CPU": cluster.cpus_per_worker, **({"GPU": cluster.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"run": run, "stage": stage},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cluster.placement),
        run_config=RunConfig(name=f"{run.job_name}-{stage}", storage_path=str(run.run_dir.stage(stage).ray_storage),
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             worker_runtime_env={"env_vars": worker_env(use_gpu)}),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface a user error as one line
        relay = find_cause(exc, RelayError)
        if relay is not None:
            raise RelayError(str(relay)) from None
        failed = first_worker_failure(exc)
        if failed is not None:
            raise WorkerFailed(failed) from exc
        raise


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment variables every training worker gets, under either launcher."""
    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "PYTHONWARNINGS": "ignore::FutureWarning"}


ACTOR_START_TIMEOUT_S = 600


def generate_on_ray(model_dir: str, rows: list[dict], params: dict, *, chat: bool, workers: int,
                    cpus_per_worker: float = 1, gpus_per_worker: float = 0, batch_size: int = 16, progress=None,
                    work: str = "complete") -> list[dict]:
    """Completions (or, by `work`, scores: GenerationWorker) for `rows`, in input order, from a
    pool of `workers` generation actors; `progress(done)` is called as results arrive."""
    import ray.data

    from pipelines.generation.worker import GenerationWorker

    have = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    for kind, amount in need.items():
        if amount > have.get(kind, 0):
            raise RelayError(f"generation workers: {workers} worker(s) need {amount:g} {kind}s in all, "
                             f"but the Ray cluster has {have.get(kind, 0):g}; use fewer workers or less per worker")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    # A pool that cannot start (its resources are held elsewhere) is an error after this long, not a hang.
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    items = [{"_index": i, "_row": json.dumps(row, ensure_ascii=False)} for i, row in enumerate(rows)]
    blocks = max(workers, min(len(items), workers * 4))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    threads = max(1, int(cpus_per_worker))
    gpus = {"num_gpus": gpus_per_worker} if gpus_per_worker else {}
    pool = ds.map_batches(
        GenerationWorker,
        fn_constructor_kwargs={"model_dir": str(model_dir), "params": params, "chat": chat, "batch_size": batch_size, "threads": threads,
                               "work": work},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker, **gpus,
    )
    out = []
    try:
        for batch in pool.iter_batches(batch_size=None, batch_format="numpy"):
            out.extend({"_index": int(i), "_result": r} for i, r in zip(batch["_index"], batch["_result"]))
            if progress is not None:
                progress(len(out))
    except ray.exceptions.GetTimeoutError:
        raise RelayError(f"generation workers: the pool of {workers} did not start within {ACTOR_START_TIMEOUT_S} s; "
                         "the cluster's CPUs/GPUs are held by other work (ray status shows what is running)") from None
    out.sort(key=lambda r: r["_index"])
    return [json.loads(r["_result"]) for r in out]
