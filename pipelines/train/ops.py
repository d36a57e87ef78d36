"""DeepSpeed's C++ ops, built once per machine and never waited on forever.

DeepSpeed JIT-compiles CPU Adam through torch's extension loader on first use. That loader marks
a build in progress with a plain `lock` file in the build folder and waits, without a limit, for
it to go away; a build that was killed (a stopped job, a timed-out test) leaves the file behind
and every later run on the machine hangs. relaygpt takes a kernel lock of its own around the
load, which dies with its holder: while it is held no relaygpt process is building, so a `lock`
file found under it is a killed build's and is removed."""

from __future__ import annotations

import fcntl
from pathlib import Path


def _build_dir(name: str) -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def cpu_adam(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, say=print):
    """DeepSpeed's CPU Adam over these groups (AdamW mode), building the op first where needed."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    build = _build_dir("cpu_adam")
    build.mkdir(parents=True, exist_ok=True)
    with open(build.parent / ".relaygpt-build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        baton = build / "lock"
        if baton.exists():
            baton.unlink()
            say(f"removed {baton}, left by a build that was killed")
        if not (build / "cpu_adam.so").exists():
            say(f"building DeepSpeed's CPU Adam, once per machine (about a minute on 2 cores), into {build}")
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
