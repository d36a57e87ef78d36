"""`relaygpt sweep`: measure a base job at every point of a grid, one short training stage on
Ray per point, then write the results, the report and the plots.

    OUT/<sweep-name>/
      sweep.yaml            the resolved sweep
      data/<fingerprint>/   tokenizer + shards, shared by every point with the same data settings
      points/pNNN/          point.json (axes, overrides, fingerprint, row), the stage's metrics.jsonl,
                            tensorboard/, result.json; tokenizer/ and data/ link to the shared data
      results.csv report.md *.png summary.json

A point already measured with the same fingerprint is not run again, so an interrupted or
extended sweep continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from model.errors import RelayError
from model.atomic import write_text_atomically


def run_sweep(sweep, out_dir: Path, *, address: str | None = None, show=print) -> dict:
    """Every point of `sweep`, measured or skipped with its reason; returns the sweep summary."""
    from cluster.preflight import check
    from cluster.runtime import ray_session
    from jobs.sweep import expand_points

    out_dir = Path(out_dir)
    points = expand_points(sweep)
    axes = list(dict.fromkeys([*sweep.grid, *(k for p in sweep.points for k in p)]))
    for p in points:
        if p.reason is None:
            problems = check(p.job, _point_dir(out_dir, p))[1]
            p.reason = "; ".join(problems) or None
    runnable = [p for p in points if p.reason is None]
    show(f"[sweep] {sweep.name}: {len(points)} point(s), {len(points) - len(runnable)} refused by the planner")
    (out_dir / "points").mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / "sweep.yaml", yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    wanted = max([p.job.cluster.num_workers * p.job.cluster.cpus_per_worker + 1 for p in runnable] or [1])
    started, rows = time.time(), []
    with ray_session(address, num_cpus=math.ceil(wanted)):
        for p in points:
            row = {"point": p.id, "status": "skipped", "reason": p.reason, **p.axes}
            if p.reason is None:
                row = _measured_or_run(sweep, p, out_dir, row, show)
            else:
                show(f"[{p.id}] {p.label}: skipped ({p.reason})")
            rows.append(row)
    return _finish(sweep, rows, axes, out_dir, time.time() - started, show)


def _point_dir(out_dir: Path, point):
    from pipelines.rundir import RunDir

    return RunDir(out_dir / "points" / point.id)


def _measured_or_run(sweep, point, out_dir: Path, row: dict, show) -> dict:
    from cluster.preflight import check_resources

    record = out_dir / "points" / point.id / "point.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") == point.fingerprint and saved["row"]["status"] == "measured":
            show(f"[{point.id}] {point.label}: measured earlier, kept")
            return saved["row"]
    try:
        check_resources(point.job)
    except RelayError as exc:
        show(f"[{point.id}] {point.label}: skipped ({exc})")
        return {**row, "reason": str(exc)}
    try:
        row = {**row, **_run_point(sweep, point, out_dir, show), "status": "measured", "reason": "-"}
    except RelayError as exc:
        row = {**row, "status": "failed", "reason": str(exc)}
    except Exception as exc:  # a point that crashes (out of memory, a dead node) is a result of the sweep, not its end
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        row = {**row, "status": "failed", "reason": f"{type(exc).__name__}: {first}"[:300]}
    if row["status"] == "failed":
        show(f"[{point.id}] {point.label}: failed ({row['reason']})")
    write_text_atomically(record, json.dumps({"axes": point.axes, "overrides": point.overrides, "fingerprint": point.fingerprint,
                                              "row": row}, indent=2, default=str) + "\n")
    return row


def _run_point(sweep, point, out_dir: Path, show) -> dict:
    from cluster import launch
    from jobs.fingerprints import fingerprints
    from jobs.plan import data_plan, resolve_plan
    from pipelines.accounting import stage_usage
    from pipelines.rundir import RunDir
    from pipelines.sweep.measure import measure, model_label

    job, stage = point.job, sweep.stage
    data = RunDir(out_dir / "data" / fingerprints(job)["data"])
    prepared = launch.prepare_run_data(data_plan(job), data)
    run_dir = _point_dir(out_dir, point)
    run_dir.remove(run_dir.stage(stage).root)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    for shared, link in ((data.tokenizer, run_dir.tokenizer), (data.data(stage).parent, run_dir.data(stage).parent)):
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        os.symlink(os.path.relpath(shared, run_dir.root), link)
    if stage == "sft" and not getattr(job.stages, stage).init:
        raise RelayError("stages.sft.init: an SFT sweep point needs a model directory to start from")
    run = resolve_plan(job, run_dir, vocab_size=prepared["tokenizer"]["n_vocab"])  # the tokenizer step's: not looked up again
    t0 = time.time()
    launch.train_on_ray(run, stage, job.cluster)
    wall = time.time() - t0
    record = run_dir.stage(stage)
    row = measure(run.stage(stage), model_label(job.model), record.metrics.records(), record.result(), sweep.warmup_steps)
    usage = stage_usage(stage, wall, job.cluster, job.stages.eval, job.data.num_proc)
    row.update(wall_s=wall, gpu_hours=usage.gpu_hours, core_hours=usage.core_hours, cost=_prices(sweep, job).cost(usage))
    show(f"[{point.id}] {point.label}: {row['tokens_per_s']:,.0f} tok/s ({row['tokens_per_s_per_worker']:,.0f}/worker), "
         f"step {row['step_time_s']:.3f} s, {row['peak_memory_gb_per_worker']:.2f} GB/worker, loss {row['final_loss']:.4f}")
    return row


def _prices(sweep, job):
    from pipelines.accounting import Prices

    return Prices(sweep.cost.price_per_gpu_hour if sweep.cost.price_per_gpu_hour is not None else job.cluster.price_per_gpu_hour,
                  sweep.cost.price_per_core_hour if sweep.cost.price_per_core_hour is not None else job.cluster.price_per_core_hour)


def _finish(sweep, rows: list[dict], axes: list[str], out_dir: Path, seconds: float, show) -> dict:
    from pipelines.accounting import totals as sum_usage
    from pipelines.sweep.measure import loss_fit, scaling_efficiency
    from pipelines.sweep.report import best_per_model, write_csv, write_plots, write_report

    scaling_efficiency(rows)
    measured = [r for r in rows if r["status"] == "measured"]
    totals = sum_usage(measured)
    fit = loss_fit(rows)
    plots = write_plots(rows, axes, fit, out_dir)
    write_csv(rows, axes, out_dir / "results.csv")
    write_report(sweep, rows, axes, totals, fit, plots, out_dir / "report.md")
    summary = {
        "sweep": sweep.name, "seconds": round(seconds, 1),
        "points": {"total": len(rows), "measured": len(measured), "skipped": sum(r["status"] == "skipped" for r in rows),
                   "failed": sum(r["status"] == "failed" for r in rows)},
        "best": best_per_model(rows),
        "cost": totals,
        "power_law": None if fit is None else {"coefficient": fit.coefficient, "exponent": fit.exponent, "r2": fit.r2},
        "paths": {"results": str(out_dir / "results.csv"), "report": str(out_dir / "report.md"), "plots": plots},
    }
    write_text_atomically(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    show(f"[sweep] {summary['points']['measured']} measured, {summary['points']['skipped']} skipped, "
         f"{summary['points']['failed']} failed; report {out_dir / 'report.md'}")
    return summary
