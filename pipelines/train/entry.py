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
