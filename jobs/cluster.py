"""Where a job runs: the cluster section of the job file's schema (Ray placement, resources, the
training launcher, prices)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from model.errors import RelayError
from pipelines.settings import Strict


def parse_address(address: str, field: str, schemes: tuple[str, ...] = ("ray", "tcp")) -> tuple[str, int]:
    """(host, port) of `address` (`host:port` or `scheme://host:port`), or a ValueError that
    names `field` and what would be valid: a port past 65535 or an unclosed `[::1` included."""
    example = "http://HOST:8265" if "http" in schemes else "HOST:6379 or ray://HOST:10001"
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"{field}: an address is host:port ({example}), got {address!r}")
    try:
        parsed = urlparse(address if "://" in address else f"{schemes[-1]}://{address}")
        host, port = parsed.hostname, parsed.port
    except ValueError as exc:  # urllib: "Port out of range 0-65535", "Invalid IPv6 URL"
        raise ValueError(f"{field}: {address!r} is not a valid address ({exc}); expected {example}") from None
    if parsed.scheme not in schemes:
        raise ValueError(f"{field}: {address!r} uses the scheme {parsed.scheme!r}; expected {example}")
    if not host or not port:
        raise ValueError(f"{field}: {address!r} needs a host and a port (1-65535); expected {example}")
    return host, port


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

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value):
        if value is not None and value != "auto":
            parse_address(value, "cluster.address")
        return value


def check_ray_address(address: str | None) -> None:
    """--address of a Ray cluster (host:port, ray://host:port): checked before anything starts."""
    if address is not None and address != "auto":
        try:
            parse_address(address, "--address")
        except ValueError as exc:
            raise RelayError(str(exc)) from None
