"""The data stage resolved: what preparing a job's tokenizer and data reads, and nothing else.

jobs/plan.py builds a `DataPlan` from the job once (no file is read or written); the tokenizer
step, the pretraining, SFT and preference preparation and the driver's input fingerprints take
it instead of the job. Its sections are the job file's `tokenizer:` and `data:` as written
(their fingerprints are digests of exactly these settings, so a re-run with the same job file
finds its prepared data current), with everything they leave to other sections resolved: the
job file's folder, absolute, against which their relative paths are read; the SFT and
preference row lengths (default: the context of the model the stage trains); the pretraining
window that the training split must fill at least once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataPlan:
    """name: the job's (a trained tokenizer is named after it). seed: the job's (splits, BPE).
    base_dir: the job file's folder, absolute. tokenizer, data: the job's sections as written.
    sft_seq_len, dpo_seq_len: the packed row lengths (None without that data section).
    pretrain_window: stages.pretrain.seq_len or the model's block_size (None without a pretrain
    stage). fingerprint: the data stage's input fingerprint ("" until the driver hashed its inputs,
    jobs/fingerprints.py)."""

    name: str
    seed: int
    base_dir: Path
    tokenizer: Any  # pipelines/data/config.py TokenizerSpec (not imported: config imports the data modules)
    data: Any       # pipelines/data/config.py DataSpec
    sft_seq_len: int | None = None
    dpo_seq_len: int | None = None
    pretrain_window: int | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not Path(self.base_dir).is_absolute():
            raise ValueError(f"DataPlan.base_dir must be absolute, got {self.base_dir}")

    def path(self, value: str) -> Path:
        """A path of the job file (a source's, the tokenizer's) as a path on this machine:
        relative ones are relative to the job file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def label(self, path: Path) -> str:
        """How messages name an input file: relative to the job file's folder when it lies inside it."""
        path = Path(os.path.abspath(path))
        try:
            return path.relative_to(self.base_dir).as_posix()
        except ValueError:
            return str(path)
