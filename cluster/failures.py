"""Why a stage failed, in one line: the training worker whose error most likely caused the
others', named by rank, and an error's first meaningful line. Shared by both launchers
(cluster/launch.py, cluster/local.py) and the driver."""

from __future__ import annotations


class WorkerFailed(RuntimeError):
    """A training worker's error, named by rank and its own exception (Ray's wrapper says only
    that workers failed); the chained cause keeps every worker's traceback for the log."""


# A rank that fails because another one died reports the lost connection, not the cause.
_KNOCK_ON = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "distbackenderror", "timed out")


def first_worker_failure(exc: BaseException) -> str | None:
    """`rank N: Error: message` of the failure that most likely caused the others: the lowest
    rank whose error is not a lost connection to its peers (else the lowest rank)."""
    failures = next((e.worker_failures for e in _causes(exc) if getattr(e, "worker_failures", None)), None)
    if not failures:
        return None
    return name_the_cause({rank: describe_error(getattr(error, "cause", None) or error) for rank, error in failures.items()})


def describe_error(error: BaseException) -> str:
    """`Error: the first line of its message`."""
    return f"{type(error).__name__}{': ' + first_line(error) if first_line(error) else ''}"


def name_the_cause(described: dict[int, str]) -> str:
    """`rank N: what failed` of the failure that most likely caused the others (see
    `first_worker_failure`), from each failed rank's description."""
    rank = min(described, key=lambda r: (any(word in described[r].lower() for word in _KNOCK_ON), r))
    others = f" (and {len(described) - 1} other rank(s); all in the log)" if len(described) > 1 else ""
    return f"rank {rank}: {described[rank]}{others}"


def first_line(exc: BaseException) -> str:
    """The first line of an error's message that says something (Ray's wrappers open with a
    header ending in ':'), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.endswith(":")), lines[0] if lines else "")[:300]


def _causes(exc: BaseException | None):
    """`exc` and the errors it wraps (Ray's `cause`, then Python's chaining), each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def find_cause(exc: BaseException, kind: type) -> BaseException | None:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)
