"""The one place that sets up torch.distributed for a training worker.

Ray Train and torchrun both describe the process group with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; a lone process (a test, a debugging session) gets a world of one
on 127.0.0.1. The backend is NCCL on GPUs and gloo on CPUs; DeepSpeed's accelerator follows.
"""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Also when the launcher (Ray Train) has already made the process group: DeepSpeed's own
    # communication backend wraps it, and a PipelineModule asks it for ranks before
    # deepspeed.initialize would set it up.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
