"""Starting or joining Ray: the one place the driver touches ray.init.

No address: an embedded Ray on this machine, its services bound to 127.0.0.1 and no dashboard.
An address: join that cluster (`host:port` of a head started with `ray start --head`, or
`ray://host:10001`); it is checked to be reachable first, so a typo fails in seconds with a
clear message instead of Ray retrying for a minute.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from urllib.parse import urlparse

from jobs.cluster import parse_address
from model.errors import RelayError


def check_reachable(address: str, timeout: float = 3.0, field: str = "cluster.address") -> None:
    if address == "auto":
        return
    try:
        host, port = parse_address(address, field, ("ray", "tcp"))
    except ValueError as exc:
        raise RelayError(str(exc)) from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RelayError(f"{field}: cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                         "is it running (ray start --head)?") from None


def is_loopback(address: str) -> bool:
    """A cluster on this machine's loopback: the driver must register on 127.0.0.1 too, or Ray
    looks for a raylet on the machine's network address and waits for it."""
    try:
        host = urlparse(address if "://" in address else f"tcp://{address}").hostname or ""
    except ValueError:
        return False
    return host in ("localhost", "::1") or host.startswith("127.")


def keep_on_loopback() -> None:
    """Make Ray treat this node as 127.0.0.1 (its single-machine mode). Ray otherwise rewrites
    127.0.0.1 into the machine's network address when it connects. Must run before `import ray`,
    and only for an embedded or a loopback cluster, never when joining real nodes."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Connect to (or start) Ray for the duration of the block; leaves a caller's session alone."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or is_loopback(address):
        keep_on_loopback()
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:  # RAY_ADDRESS is set for a driver that runs as a Ray Job
        check_reachable(address)
        extra = {"_node_ip_address": "127.0.0.1"} if is_loopback(address) else {}
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True, runtime_env=own_code_only(), **extra)
        except (ConnectionError, RuntimeError) as exc:
            cause = str(exc.__cause__ or exc).splitlines()[0]
            hint = (" (a head on this machine must be started with --node-ip-address 127.0.0.1 to be joined at 127.0.0.1; "
                    "otherwise use its network address)") if is_loopback(address) else ""
            raise RelayError(f"cluster.address: could not join the Ray cluster at {address}: {cause}{hint}") from None
    else:
        start_embedded(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def joins_a_cluster(address: str | None) -> bool:
    """Whether this driver's Ray work goes to a cluster that is already there: an address
    (--address, cluster.address, or RAY_ADDRESS as a Ray Job's driver has) or a Ray this process
    is connected to. Otherwise the run is embedded: everything on this machine."""
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # not imported: not connected (and importing it costs a second)
    return bool(ray is not None and ray.is_initialized())


class RayOnDemand:
    """Ray for the stages that need it: started or joined (`ray_session`) the first time
    `ensure()` is called, left when the `with` block ends; a run whose stages all work without
    Ray never starts one. `clock` (cluster/startup.py) times the start as `ray_start`;
    `on_start` runs once Ray is up (the resource check)."""

    def __init__(self, address: str | None, *, num_cpus: int | None = None, clock=None, on_start=None) -> None:
        self.address, self.num_cpus, self.clock, self.on_start = address, num_cpus, clock, on_start
        self.started = False
        self._stack = ExitStack()

    def __enter__(self) -> "RayOnDemand":
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def ensure(self) -> None:
        if self.started:
            return
        with self.clock.phase("ray_start") if self.clock is not None else nullcontext():
            self._stack.enter_context(ray_session(self.address, num_cpus=self.num_cpus))
        self.started = True
        if self.on_start is not None:
            self.on_start()


def start_embedded(num_cpus: int | None = None) -> None:
    """A local Ray with at least `num_cpus` logical CPUs, every service on 127.0.0.1."""
    keep_on_loopback()
    import ray

    cpus = max(os.cpu_count() or 1, num_cpus or 1)
    # Ray turns token authentication on for a new local cluster and says so in a warning; the
    # terminal is for relaygpt's own lines (a user error must stay one line).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # The dashboard serves Ray's state API, which Ray Train polls; it listens on loopback only.
    # A free port, not 8265: an embedded Ray must not collide with a cluster already on this machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    # address="local": always a new Ray, never one that a file in /tmp/ray names from earlier.
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=True, runtime_env=own_code_only())


def own_code_only() -> dict:
    """The driver's runtime environment for every task and actor it starts: each worker pins
    relaygpt's packages to where relaygpt is installed when it starts, before Ray puts this
    driver's current folder first on its path (cluster/own_code.py). A Ray Job's own runtime
    environment (relaygpt submit) is merged with it by Ray."""
    from cluster.own_code import SETUP_HOOK

    return {"worker_process_setup_hook": SETUP_HOOK}


def cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()
