"""The entry every training worker runs (Ray Train, local child processes, torchrun): one stage
of a resolved run, with the trainer its settings call for (pipelines/train/trainer.py, or
pipelines/train/dpo.py for preference pairs)."""

from __future__ import annotations

from pipelines.train.trainer import Trainer


def train_stage(run, stage: str, *, console: bool = True, until_step: int | None = None) -> dict:
    """Train one stage of a resolved run on this worker; returns the final metrics (complete on rank 0).

    `console` prints the progress line (torchrun); under Ray the driver shows its own display.
    """
    from pipelines.train.settings import DPOStageSpec

    if isinstance(run.stage(stage).settings, DPOStageSpec):  # pairs and the DPO loss; the same loop
        from pipelines.train.dpo import DPOTrainer as trainer_class  # noqa: N813
    else:
        trainer_class = Trainer
    trainer = trainer_class(run, stage, console=console)
    trainer.build()
    trainer.resume()
    trainer.startup.mark("resumed")
    trainer.startup.mark_first_step(trainer.engine)
    return trainer.fit(until_step)


def evaluate(engine, windows, plan, byte_lengths: np.ndarray) -> dict:
    """Validation loss (per supervised token) and bits per byte over `eval_batches` micro-batches."""
    from pipelines.data.loader import eval_batches

    topo = engine.topology
    steps = min(plan.settings.eval_batches, windows.num_windows // (plan.micro_batch * topo.dp))
    if steps == 0:
        return {}
    batches = eval_batches(windows, plan.micro_batch, dp_rank=topo.dp_rank, dp_size=topo.dp, max_batches=steps)
    sums = torch.zeros(3, dtype=torch.float64)  # nats, supervised targets, bytes
    for _ in range(steps):
        x, y = next(batches)
        loss = engine.micro_batch_loss(x, y)
        # A pipeline returns the same data-parallel mean loss on every rank; each first-stage rank
        # weighs it by its own targets (exact when ranks hold equally many, as in pretraining).
        if not engine.pipelined or topo.is_first_stage:
            keep = y != IGNORE_INDEX
            count = int(keep.sum())
            sums += torch.tensor([loss * count, count, float(byte_lengths[y[keep].numpy()].sum())], dtype=torch.float64)
    reduced = sums.to(engine.reduce_device)
    dist.all_reduce(reduced)
    nats, count, nbytes = reduced.tolist()
    return {"val/loss": nats / max(count, 1), "val/bpb": bits_per_byte(nats, int(nbytes))}


def _peak_memory_per_rank(engine) -> list[float]:
    """Every rank's peak memory in GB (a collective): pipeline stages and ZeRO shards differ."""
    mine = torch.tensor([peak_memory_bytes() / 1e9], dtype=torch.float64, device=engine.reduce_device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [round(float(t), 4) for t in gathered]


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
