"""Throughput, MFU, memory and bits per byte; the TensorBoard writer of rank 0."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

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
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_bytes() -> int:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
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
    """Wall time per step, excluding the first `skip` steps from the running average."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


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
