"""Benchmarks: each prints a ratio against a peer measured in the same run, and appends the
numbers to tests/perf/results.jsonl (untracked) for docs/PERFORMANCE.md. Nothing here
asserts a wall-clock time."""

import json
import os
import platform
import time
from pathlib import Path

import pytest

# tests/conftest.py (the offline environment, the tiktoken cache, shared fixtures) applies here too.

RESULTS = Path(__file__).with_name("results.jsonl")


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo), recorded beside every result: BLAS kernels and so
    ratios differ between processors."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or "unknown"


@pytest.fixture
def record():
    def _record(name: str, **numbers):
        row = {"bench": name, "when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "machine": platform.machine(),
               "cpu": cpu_model(), **numbers}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"\n[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()))
    return _record


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded Ray in this process: the benchmarks time Ray Data against direct calls, so the
    driver must be this process. Shut down at the end of the session."""
    import ray

    from cluster.runtime import start_embedded

    start_embedded(num_cpus=4)
    yield ray
    ray.shutdown()
