"""Throughput, MFU, memory and bits per byte; the TensorBoard writer of rank 0.

torch is imported where it is used: the driver's progress display formats steps with
`progress_line` and must not pay torch's import (a second of a core the workers are starting on).
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import numpy as np

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def device_peak_flops(configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of this process's device: the configured number, the table, or None (CPU)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_bytes() -> int:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens), for bits per byte."""
    lengths = np.zeros(tokenizer.n_vocab, dtype=np.int64)
    for token, rank in tokenizer.mergeable_ranks.items():
        lengths[rank] = len(token)
    return lengths


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")


class StepTimer:
    """Mean wall time of the training steps since the last report. Evaluation and checkpoint
    time is not step time: `skip()` drops whatever ran since the last step."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.total, self.steps = 0.0, 0

    def step_done(self) -> None:
        now = time.perf_counter()
        self.total, self.steps, self.last = self.total + now - self.last, self.steps + 1, now

    def skip(self) -> None:
        self.last = time.perf_counter()

    def take_mean(self) -> float:
        """Mean step time of the window, and a new window."""
        mean = self.total / max(self.steps, 1)
        self.total, self.steps = 0.0, 0
        return mean


class Board:
    """TensorBoard scalars and text; a no-op on every rank but 0."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def progress_line(metrics: dict) -> str:
    """The console line of one logged step: what torchrun prints and the driver's display shows."""
    parts = [f"[{metrics['stage']}] step {metrics['step']}/{metrics['total_steps']}"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                     f"{metrics['perf/tokens_per_s']:.0f} tok/s  eta {metrics.get('eta_s', 0):.0f}s")
    if "train/rewards/accuracy" in metrics:
        parts.append(f"margin {metrics['train/rewards/margin']:.3f}  acc {metrics['train/rewards/accuracy']:.2f}")
    if "val/loss" in metrics:
        parts.append(f"val loss {metrics['val/loss']:.4f}  " + (f"val bpb {metrics['val/bpb']:.3f}" if "val/bpb" in metrics else
                                                               f"val margin {metrics['val/rewards/margin']:.3f}  "
                                                               f"val acc {metrics['val/rewards/accuracy']:.2f}"))
    return "  ".join(parts)


class MetricsLogger:
    """A stage's metrics on rank 0: TensorBoard scalars, the same scalars to the job's run
    trackers (MLflow, W&B: pipelines/train/tracking.py, with `params` once), the metrics.jsonl
    step log and, under torchrun, the console line. Every method is a no-op on the other ranks."""

    def __init__(self, stage_dir, *, rank: int, console: bool, tracking=None, params: dict | None = None) -> None:
        from pipelines.rundir import MetricsLog
        from pipelines.train.tracking import Trackers

        writer = rank == 0
        self.board = Board(stage_dir.tensorboard if writer else None)
        self.trackers = Trackers(tracking if writer else None, stage_dir.root, params or {})
        self.log_file = MetricsLog(stage_dir.metrics.path) if writer else None
        self.console = console and writer

    def text(self, tag: str, text: str) -> None:
        self.board.text(tag, text)

    def log(self, step: int, metrics: dict) -> None:
        """`metrics` holds `stage`, `step`, `total_steps` and the values; names with a '/' are scalars."""
        scalars = {k: v for k, v in metrics.items() if "/" in k}
        self.board.scalars(step, scalars)
        self.trackers.scalars(step, scalars)
        if self.log_file is not None:
            self.log_file.append(metrics)
        if self.console:
            print(progress_line(metrics), flush=True)

    def close(self) -> None:
        self.board.close()
        self.trackers.close()
