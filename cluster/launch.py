"""Running the stages on Ray: data preparation as a task, training on Ray Train, generation on
a Ray Data actor pool. The work itself lives in pipelines/; this module only places it.

Multi-node runs need the run directory on a filesystem every node sees (checkpoints, data
shards and exports are read and written by whichever node a worker lands on).
"""

from __future__ import annotations

import json
from model.errors import RelayError


def prepare_on_ray(job, run_dir) -> dict:
    """Tokenizer and data preparation of `run_dir` (a RunDir) as one Ray task; returns the manifests' counts."""
    import ray

    @ray.remote(num_cpus=1)
    def prepare(job, run_dir):
        from pipelines.data.prepare import prepare_data

        out = prepare_data(job, run_dir)
        tok = out.pop("tokenizer")
        return {"tokenizer": {**tok.identity, "n_vocab": tok.n_vocab},
                **{stage: {"cached": m["cached"], **{name: split.get("tokens") for name, split in m["splits"].items()}}
                   for stage, m in out.items()}}

    return _get(prepare.remote(job, run_dir))


def _get(ref):
    """ray.get that turns a user error raised remotely back into a RelayError."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        if isinstance(cause, RelayError) or isinstance(getattr(exc, "cause", None), RelayError):
            raise RelayError(str(getattr(exc, "cause", cause))) from None
        raise


def _train_loop(config: dict) -> None:
    """What every Ray Train worker runs: the same function torchrun runs, on the driver's plan."""
    import os
    import socket

    import ray
    import ray.train

    from pipelines.train.trainer import train_stage

    run, stage = config["run"], config["stage"]
    # Where each rank runs (node, host, pid): for placement checks and debugging.
    rank = ray.train.get_context().get_world_rank()
    where = run.run_dir.stage(stage).workers
    where.mkdir(parents=True, exist_ok=True)
    (where / f"rank_{rank}.json").write_text(json.dumps({
        "rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}))
    train_stage(run, stage, console=False)


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
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
                                                              "PYTHONWARNINGS": "ignore::FutureWarning"}}),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface a user error as one line
        relay = _find_cause(exc, RelayError)
        if relay is not None:
            raise RelayError(str(relay)) from None
        raise


def _find_cause(exc: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        inner = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        exc = inner
    return None


ACTOR_START_TIMEOUT_S = 600


def generate_on_ray(model_dir: str, rows: list[dict], params: dict, *, chat: bool, workers: int,
                    cpus_per_worker: float = 1, gpus_per_worker: float = 0, batch_size: int = 16) -> list[dict]:
    """Completions for `rows`, in input order, from a pool of `workers` generation actors."""
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
        fn_constructor_kwargs={"model_dir": str(model_dir), "params": params, "chat": chat, "batch_size": batch_size, "threads": threads},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker, **gpus,
    )
    try:
        out = pool.take_all()
    except ray.exceptions.GetTimeoutError:
        raise RelayError(f"generation workers: the pool of {workers} did not start within {ACTOR_START_TIMEOUT_S} s; "
                         "the cluster's CPUs/GPUs are held by other work (ray status shows what is running)") from None
    out.sort(key=lambda r: r["_index"])
    return [json.loads(r["_result"]) for r in out]
