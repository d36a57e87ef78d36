"""A training stage's start-up as rank 0 sees it: wall-clock times (time.time(), comparable
with the driver's on the same machine) of

    distributed   torch.distributed up (the process started, its imports done, the group made)
    built         the stage built: tokenizer, data windows, the DeepSpeed engine, the loader
    resumed       the newest checkpoint loaded, or a fresh start recorded
    first_step    the first optimizer step of this attempt done

Rank 0 writes them to RUN/<stage>/startup.json when its first step is done, unless an earlier
attempt of the stage already did (a restarted worker group keeps the first start-up); the
driver turns them and its own times into the run's start-up phases (cluster/startup.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

WORKER_MARKS = ("distributed", "built", "resumed", "first_step")


@dataclass
class WorkerStartup:
    """The marks of one rank in one attempt at a stage; only rank 0 writes them."""

    path: Path
    rank: int
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, event: str) -> None:
        assert event in WORKER_MARKS, event
        self.marks[event] = time.time()
        if event == "first_step" and self.rank == 0 and not self.path.exists():
            from model.atomic import write_json_atomically

            write_json_atomically(self.path, self.marks)

    def mark_first_step(self, engine) -> None:
        """Mark `first_step` when `engine.train_step` next returns. The mark rides on the
        engine's own call (and is gone after it), so the training loop knows nothing of it.
        On a GPU the step is waited for: a step's kernels run after its call returns."""
        step = engine.train_step

        def first_step(batches, **kwargs):
            out = step(batches, **kwargs)
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.mark("first_step")
            del engine.train_step  # the engine's own method again
            return out

        engine.train_step = first_step
