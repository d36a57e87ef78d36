"""Starting or joining Ray: the one place the driver touches ray.init.

No address: an embedded Ray on this machine, its services bound to 127.0.0.1 and no dashboard.
An address: join that cluster (`host:port` of a head started with `ray start --head`, or
`ray://host:10001`); it is checked to be reachable first, so a typo fails in seconds with a
clear message instead of Ray retrying for a minute.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from model.errors import RelayError


def check_reachable(address: str, timeout: float = 3.0) -> None:
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise RelayError(f"cluster.address: {address!r} is not host:port or ray://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RelayError(f"cluster.address: cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                         "is it running (ray start --head)?") from None


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Connect to (or start) Ray for the duration of the block; leaves a caller's session alone."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_reachable(address)
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, num_cpus or 1)
        # The dashboard serves Ray's state API, which Ray Train polls; it listens on loopback only.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()
