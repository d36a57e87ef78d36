"""The one place that sets up torch.distributed for a training worker.

Ray Train and torchrun both describe the process group with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; a lone process (a test, a debugging session) gets a world of one
on 127.0.0.1. The backend is NCCL on GPUs and gloo on CPUs; DeepSpeed's accelerator follows.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not torch.cuda.is_available():
        skip_shm_comm_op(deepspeed)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Also when the launcher (Ray Train) has already made the process group: DeepSpeed's own
    # communication backend wraps it, and a PipelineModule asks it for ranks before
    # deepspeed.initialize would set it up.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_shm_comm_op(deepspeed) -> None:
    """Keep DeepSpeed's communication backend from building and loading its CPU shared-memory
    op. The op serves only `inference_all_reduce` (AutoTP inference layers), which relaygpt
    never calls; training collectives go through torch.distributed (gloo) either way. Building
    it is a JIT compile (about 30 s on 2 cores) that runs again whenever the build cache in
    ~/.cache/torch_extensions was last built by another ninja, and loading it costs every rank
    a moment at start. DeepSpeed (comm/torch.py, build_shm_op) skips an op marked incompatible;
    the table is probed once per process and edits to it persist."""
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def from_rank_0(value):
    """Rank 0's `value` on every rank (a collective)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(value) -> list:
    """Every rank's `value`, in rank order, on every rank (a collective)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_allocations(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc serve every host allocation of `threshold_bytes` or more from its own mapping,
    returned to the system the moment it is freed.

    By default glibc raises that threshold each time a large block is freed (up to 32 MiB), so
    a build that allocates whole weights, keeps shards and frees the rest leaves the freed
    blocks resident in its heap: measured on GPT-2 350M under zero.Init, 1096 MiB resident
    instead of 887. Fixing the threshold keeps resident memory at what is alive. Returns False
    where the C library is not glibc (nothing changes there)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
