"""The demo's headline numbers, reproduced: jobs/tiny-assistant.yaml run as `make demo` runs it
(embedded Ray, 2 training workers), once per seed, each in a fresh output directory.

What the README quotes is the mean and range printed here. Targets (issue 14): the assistant
answers >= 0.9 of the held-out questions on every seed, and the base model (never tuned to
answer) stays low. The same seed run twice on one machine gives the same numbers: the second
run of the first seed checks that.

    .venv/bin/python -m pytest -q -s tests/perf/bench_demo_seeds.py
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "tiny-assistant.yaml"
SEEDS = [int(s) for s in os.environ.get("DEMO_SEEDS", "1234,1,2").split(",")]


def _run(out: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "cluster.cli", "run", str(JOB), "--out", str(out), "--set", f"seed={seed}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "tiny-assistant" / "default" / "summary.json").read_text())
    return {"assistant": summary["eval"]["assistant"]["synthetic"], "base": summary["eval"]["base"]["synthetic"],
            "seconds": summary["seconds"]["total"]}


def test_demo_over_seeds(tmp_path, record):
    scores = {seed: _run(tmp_path / f"seed{seed}", seed) for seed in SEEDS}
    again = _run(tmp_path / f"seed{SEEDS[0]}-again", SEEDS[0])
    assistant = [s["assistant"] for s in scores.values()]
    base = [s["base"] for s in scores.values()]
    for seed, s in scores.items():
        print(f"\nseed {seed}: assistant {s['assistant']:.3f}, base {s['base']:.3f}, {s['seconds']:.0f} s")
    print(f"seed {SEEDS[0]} again: assistant {again['assistant']:.3f}, base {again['base']:.3f}")
    record("demo_seeds", seeds=",".join(map(str, SEEDS)), assistant_mean=statistics.mean(assistant),
           assistant_min=min(assistant), assistant_max=max(assistant), base_mean=statistics.mean(base), base_max=max(base),
           same_seed_repeats=(again["assistant"], again["base"]) == (scores[SEEDS[0]]["assistant"], scores[SEEDS[0]]["base"]))
    assert min(assistant) >= 0.9, scores
    assert max(base) <= 0.2, scores
    assert (again["assistant"], again["base"]) == (scores[SEEDS[0]]["assistant"], scores[SEEDS[0]]["base"]), (again, scores)
