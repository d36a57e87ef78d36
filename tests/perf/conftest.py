"""Benchmarks: each prints a ratio against a peer measured in the same run, and appends the
numbers to tests/perf/results.jsonl (untracked) for docs/PERFORMANCE.md. Nothing here
asserts a wall-clock time."""

import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import conftest as _root  # noqa: E402,F401  (offline environment, tiktoken cache)

RESULTS = Path(__file__).with_name("results.jsonl")


@pytest.fixture
def record():
    def _record(name: str, **numbers):
        row = {"bench": name, "when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "machine": platform.machine(), **numbers}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"\n[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()))
    return _record
