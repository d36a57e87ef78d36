"""Where a job runs: the cluster section of the job file (Ray placement, resources, the
training launcher, prices)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.settings import Strict


class ClusterSpec(Strict):
    """Where the job runs. No address: an embedded Ray on this machine."""

    address: str | None = Field(None, description="Ray address (ray://host:10001 or host:6379); none starts a local Ray")
    num_workers: int = Field(1, ge=1, description="training workers (= world size = data-parallel x pipeline)")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    device_memory_gb: float | None = Field(None, gt=0, description="memory per GPU, for relaygpt plan's fit check (e.g. 80 for an H100)")
    max_failures: int = Field(0, ge=-1, description="worker failures a training stage recovers from (-1: unlimited)")
    launcher: Literal["auto", "ray", "local"] = Field(
        "auto", description="what starts the training workers: ray (Ray Train, and data preparation on Ray Data), local "
                            "(child processes of the driver, no Ray; this machine only), auto (local for one worker on an "
                            "embedded run, else ray)")
    price_per_gpu_hour: float | None = Field(None, ge=0, description="for the cost in summary.json and sweep reports (GPU stages)")
    price_per_core_hour: float | None = Field(None, ge=0, description="the same for CPU-only stages, per core-hour")
