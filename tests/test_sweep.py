"""Scaling sweeps: the arithmetic on hand-made numbers, the sweep file's errors, and a tiny
sweep run for real (Ray Train workers, DeepSpeed under gloo) with every output checked."""

import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import assert_one_line_error, relaygpt
from jobs.spec import load_job
from pipelines.accounting import Prices, Usage, account
from pipelines.sweep.measure import fit_power_law, measure, scaling_efficiency

REPO = Path(__file__).resolve().parents[1]


# ---- arithmetic ---------------------------------------------------------------------------

def _row(point, workers, tokens_per_s, model="m"):
    return {"point": point, "status": "measured", "model": model, "workers": workers, "tokens_per_s": tokens_per_s}


def test_efficiency_is_per_worker_throughput_against_the_smallest_configuration():
    rows = [_row("a", 1, 1000.0), _row("b", 2, 1800.0), _row("c", 4, 3000.0), _row("d", 1, 900.0),
            _row("e", 2, 500.0, model="big"), _row("f", 8, 1600.0, model="big"),
            {"point": "g", "status": "skipped", "reason": "no"}]
    scaling_efficiency(rows)
    eff = {r["point"]: r.get("efficiency") for r in rows}
    # Baseline of "m": the fastest one-worker point (a), not the slower one (d).
    assert eff["a"] == 1.0 and eff["b"] == pytest.approx(0.9) and eff["c"] == pytest.approx(0.75)
    assert eff["d"] == pytest.approx(0.9)
    # Each model has its own baseline: "big" starts at 2 workers.
    assert eff["e"] == 1.0 and eff["f"] == pytest.approx((1600 / 8) / (500 / 2))
    assert {r["point"]: r.get("baseline") for r in rows if r["status"] == "measured"} == {
        "a": "a", "b": "a", "c": "a", "d": "a", "e": "e", "f": "e"}
    assert "efficiency" not in rows[-1]


def test_cost_is_reserved_device_hours_times_the_price():
    gpu = Usage("pretrain", seconds=1800, workers=8, gpus_per_worker=1, cpus_per_worker=8)
    cpu = Usage("data", seconds=360, workers=1, cpus_per_worker=1)
    assert gpu.gpu_hours == 4.0 and gpu.core_hours == 32.0 and cpu.core_hours == 0.1 and cpu.gpu_hours == 0.0
    prices = Prices(per_gpu_hour=2.5, per_core_hour=0.05)
    assert prices.cost(gpu) == 10.0 and prices.cost(cpu) == pytest.approx(0.005)
    total = account([gpu, cpu], prices)
    assert total["unit"] == "GPU-hours" and total["gpu_hours"] == 4.0 and total["core_hours"] == 32.1
    assert total["cost"] == pytest.approx(10.005) and total["stages"]["pretrain"]["cost"] == 10.0
    # Without a price for one of the parts there is no total: a partial sum would understate the bill.
    assert account([gpu, cpu], Prices(per_gpu_hour=2.5))["cost"] is None
    assert account([cpu], Prices())["unit"] == "core-hours"


def test_power_law_fit_recovers_known_parameters():
    compute = np.geomspace(1e15, 1e20, 7)
    exact = fit_power_law(compute, 42.0 * compute ** -0.071)
    assert exact.coefficient == pytest.approx(42.0, rel=1e-9) and exact.exponent == pytest.approx(0.071, rel=1e-9)
    assert exact.r2 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = fit_power_law(compute, 42.0 * compute ** -0.071 * np.exp(rng.normal(0, 0.01, compute.size)))
    assert noisy.exponent == pytest.approx(0.071, abs=0.005) and 0.9 < noisy.r2 <= 1.0
    with pytest.raises(ValueError, match="two or more compute budgets"):
        fit_power_law([1e18, 1e18], [3.0, 3.1])


def test_timing_leaves_out_the_warm_up_steps(tmp_path):
    from jobs.plan import resolve_plan
    from pipelines.rundir import RunDir

    job = load_job(REPO / "jobs" / "tiny-assistant.yaml", ["cluster.num_workers=2", "stages.pretrain.micro_batch=4"])
    records = [{"step": s, "train/loss": 5.0 - s * 0.1, "train/tokens_seen": 1024 * s, "perf/step_time_s": 2.0 if s <= 3 else 0.25,
                "perf/achieved_tflops_per_device": 0.01, "perf/mfu": None} for s in range(1, 9)]
    records[-1]["val/loss"] = 4.5
    result = {"params": 900_000, "seq_len": 128, "tokens_per_step": 1024, "flops_per_token": 6e6, "tokens_seen": 8192,
              "perf/peak_memory_gb_per_rank": [0.7, 0.9]}
    plan = resolve_plan(job, RunDir(tmp_path), vocab_size=1024).stage("pretrain")
    row = measure(plan, "tiny", records, result, warmup_steps=3)
    assert row["timed_steps"] == 5 and row["step_time_s"] == 0.25
    assert row["tokens_per_s"] == 4096 and row["tokens_per_s_per_worker"] == 2048
    assert row["peak_memory_gb_per_worker"] == 0.9 and row["val_loss"] == 4.5 and row["final_loss"] == pytest.approx(4.2)
    assert row["train_flops"] == 6e6 * 8192 and row["global_batch"] == 8 and row["data_parallel"] == 2 and row["mfu"] is None


def test_a_model_size_sweep_report_fits_loss_against_compute(tmp_path):
    """The outputs from hand-made rows: three sizes whose loss follows a known power law."""
    from jobs.sweep import SweepSpec
    from pipelines.sweep.measure import loss_fit
    from pipelines.sweep.report import write_csv, write_plots, write_report

    rows = []
    for i, (model, flops) in enumerate([("tiny", 1e15), ("small", 1e16), ("gpt2-124m", 1e17)]):
        loss = 30.0 * flops ** -0.05
        rows.append({"point": f"p{i:03d}", "status": "measured", "reason": "-", "preset": model, "model": model, "params_m": 1.0 + i,
                     "workers": 2, "pipeline_stages": 1, "data_parallel": 2, "zero_stage": 1, "micro_batch": 8, "grad_accum": 1,
                     "global_batch": 16, "seq_len": 128, "timed_steps": 10, "step_time_s": 0.5 * (i + 1), "tokens_per_s": 4096.0 / (i + 1),
                     "tokens_per_s_per_worker": 2048.0 / (i + 1), "achieved_tflops_per_worker": 0.1, "mfu": 0.4,
                     "peak_memory_gb_per_worker": 1.0 + i, "final_loss": loss * 1.01, "val_loss": loss, "train_flops": flops,
                     "wall_s": 60.0, "gpu_hours": 2 * 60 / 3600, "core_hours": 0.5, "cost": 0.1})
    rows.append({"point": "p003", "status": "skipped", "reason": "stages.pretrain: pipeline stage 0 needs ~90 GiB", "preset": "1.3b"})
    scaling_efficiency(rows)
    fit = loss_fit(rows)
    assert fit.exponent == pytest.approx(0.05) and fit.coefficient == pytest.approx(30.0)
    plots = write_plots(rows, ["preset"], fit, tmp_path)
    assert sorted(Path(p).name for p in plots) == ["loss_vs_compute.png", "memory_per_worker.png", "throughput_efficiency.png"]
    columns = write_csv(rows, ["preset"], tmp_path / "results.csv")
    assert "mfu" in columns and "cost" in columns  # a GPU sweep with a price
    sweep = SweepSpec(name="sizes", base="job.yaml", grid={"preset": ["tiny", "small", "gpt2-124m", "1.3b"]}, steps=None)
    write_report(sweep, rows, ["preset"], {"gpu_hours": 0.1, "core_hours": 1.5, "cost": 0.3}, fit, plots, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "loss = 30 x C^-0.0500" in report and "![loss_vs_compute](loss_vs_compute.png)" in report
    assert "40.0%" in report and "pipeline stage 0 needs ~90 GiB" in report
    # Every model is its own baseline here (one point each), so every best is starred.
    assert report.count("★") == 3 + 1


# ---- the sweep file -----------------------------------------------------------------------

SWEEP_ERRORS = [
    ("unknown axis", "grid: {wrokers: [1, 2]}\n", ["grid.wrokers: not an axis", "did you mean 'workers'"]),
    ("unknown key", "grid: {workers: [1]}\nstesp: 4\n", ["stesp: unknown key", "did you mean 'steps'"]),
    ("strong without global batch", "grid: {workers: [1, 2]}\nscaling: strong\n", ["global_batch: strong scaling keeps"]),
    ("tokens axis with steps", "grid: {tokens: [1000, 2000]}\n", ["steps: a tokens axis trains each point's budget"]),
    ("empty axis", "grid: {workers: []}\n", ["grid.workers: needs at least one value"]),
    ("no points", "steps: 4\n", ["grid: a sweep needs a grid or points"]),
]


@pytest.mark.parametrize("name, body, needles", SWEEP_ERRORS, ids=[e[0] for e in SWEEP_ERRORS])
def test_bad_sweep_files_are_one_line_exit_2(name, body, needles, tmp_path):
    path = tmp_path / "sweep.yaml"
    # The points train a few steps: the job's 30-step warm-up is shortened, or the base job is refused for it.
    path.write_text(f"name: s\nbase: {REPO / 'jobs' / 'tiny-assistant.yaml'}\nset: [stages.pretrain.optimizer.warmup_steps=2]\n" + body)
    proc = relaygpt("sweep", path, "--out", tmp_path / "out")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_a_missing_base_job_is_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\nbase: nowhere.yaml\ngrid: {workers: [1]}\n")
    assert_one_line_error(relaygpt("sweep", path), "base: job file", "nowhere.yaml does not exist")


@pytest.mark.parametrize("name", ["sweep-cpu-demo.yaml", "sweep-gpu-scaling.yaml", "sweep-model-size.yaml"])
def test_shipped_sweeps_load_and_expand(name):
    from jobs.sweep import expand_points, load_sweep

    sweep = load_sweep(REPO / "jobs" / name)
    points = expand_points(sweep)
    runnable = [p for p in points if p.reason is None]
    assert runnable and all(p.job.stages.pretrain is not None and p.job.stages.sft is None for p in runnable)
    if sweep.scaling == "strong":  # the global batch is the same at every point
        spec = [(p.job.stages.pretrain, p.job.cluster.num_workers) for p in runnable]
        assert {s.micro_batch * s.grad_accum * (w // s.deepspeed.pipeline_stages) for s, w in spec} == {sweep.global_batch}
    if name == "sweep-model-size.yaml":
        assert len({p.job.model.preset for p in runnable}) == 6 and all(p.job.stages.pretrain.tokens for p in runnable)


# ---- a real sweep -------------------------------------------------------------------------

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_cpu_demo_sweep_runs_and_writes_every_output(ray_head, tmp_path):
    """jobs/sweep-cpu-demo.yaml with one micro-batch size instead of two (the suite's time): 1 and
    2 workers x pipeline 1 and 2, the one-worker pipeline point skipped by the planner."""
    sweep = yaml.safe_load((REPO / "jobs" / "sweep-cpu-demo.yaml").read_text())
    sweep["base"] = str(REPO / "jobs" / sweep["base"])
    sweep["grid"]["micro_batch"] = sweep["grid"]["micro_batch"][:1]
    (tmp_path / "sweep-cpu-demo.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    out = tmp_path / "out"
    proc = relaygpt("sweep", tmp_path / "sweep-cpu-demo.yaml", "--out", out, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = out / "sweep-cpu-demo"
    # relaygpt's lines only; Ray's, DeepSpeed's and the workers' are in the sweep's log
    assert proc.stderr == "" and "RayTrainWorker" not in proc.stdout and "RayTrainWorker" in (root / "logs" / "run.log").read_text()
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    measured = [r for r in rows if r["status"] == "measured"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(measured) == 3 and len(skipped) == 1
    for r in measured:
        empty = [column for column, value in r.items() if value == ""]
        assert not empty, (r["point"], empty)
        assert float(r["tokens_per_s"]) > 0 and int(r["timed_steps"]) == 6 and float(r["peak_memory_gb_per_worker"]) > 0
        assert float(r["core_hours"]) > 0 and float(r["cost"]) == pytest.approx(float(r["core_hours"]) * 0.05, rel=1e-4)
        assert math.isclose(float(r["tokens_per_s_per_worker"]) * int(r["workers"]), float(r["tokens_per_s"]), rel_tol=1e-4)
    for r in skipped:
        assert r["workers"] == "1" and r["pipeline_stages"] == "2" and "not a multiple" in r["reason"]
    assert "mfu" not in rows[0]  # a CPU-only sweep has no MFU column; it reports achieved FLOP/s
    baselines = [r for r in measured if r["baseline"] == r["point"]]
    assert len(baselines) == 1 and baselines[0]["workers"] == "1" and float(baselines[0]["efficiency"]) == 1.0
    for name in ("throughput_efficiency.png", "memory_per_worker.png"):
        width, height = _png_size(root / name)
        assert width > 300 and height > 200
    report = (root / "report.md").read_text()
    assert "★" in report and "## Skipped" in report and "not a multiple" in report and "throughput_efficiency.png" in report
    summary = json.loads((root / "summary.json").read_text())
    assert summary["points"] == {"total": 4, "measured": 3, "skipped": 1, "failed": 0}
    assert summary["cost"]["unit"] == "core-hours"
    assert summary["cost"]["cost"] == pytest.approx(sum(float(r["cost"]) for r in measured), rel=1e-4)
    # A resumed sweep keeps the points it measured (here: all of them) and runs nothing.
    again = relaygpt("sweep", tmp_path / "sweep-cpu-demo.yaml", "--out", out, "--address", ray_head.address,
                     env=ray_head.env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("measured earlier, kept") == 3
    with open(root / "results.csv", newline="") as f:
        assert [r["tokens_per_s"] for r in csv.DictReader(f)] == [r["tokens_per_s"] for r in rows]


def test_a_sweep_that_is_not_utf8_text_or_is_a_directory_is_one_line(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"name: s\nbase: job.yaml\n# caf\xe9\n")
    assert_one_line_error(relaygpt("sweep", path, "--out", tmp_path / "out"), "sweep.yaml: not UTF-8 text", "a sweep file is YAML in UTF-8")
    assert_one_line_error(relaygpt("sweep", tmp_path, "--out", tmp_path / "out"), f"{tmp_path}: is a directory; give the sweep file itself")
    path.write_text(f"name: s\nbase: {REPO / 'jobs' / 'tiny-assistant.yaml'}\ngrid: {{workers: [1]}}\ngrid: {{workers: [2]}}\n")
    assert_one_line_error(relaygpt("sweep", path, "--out", tmp_path / "out"), "sweep.yaml:4: key 'grid' is repeated (first at line 3)")
    assert not (tmp_path / "out").exists()
