"""Scaling experiments, measured: per-point throughput from the training loop's own step log,
scaling efficiency, device-hours and cost, a power-law fit of loss against compute, and the
report (results.csv, report.md, PNG plots).

Timing comes from metrics.jsonl (rank 0 logs every step of a sweep point): the mean step time
over the steps after warm-up. Rank 0's step time includes every collective of the step, so it
is the step time of the whole group.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.files import write_text_atomically

# Row columns in the order results.csv writes them; the axis columns come right after `reason`.
LEADING = ["point", "status", "reason"]
METRICS = ["model", "params_m", "workers", "pipeline_stages", "data_parallel", "zero_stage", "micro_batch", "grad_accum",
           "global_batch", "seq_len", "timed_steps", "step_time_s", "tokens_per_s", "tokens_per_s_per_worker",
           "achieved_tflops_per_worker", "mfu", "peak_memory_gb_per_worker", "final_loss", "val_loss", "train_flops",
           "efficiency", "baseline", "wall_s", "gpu_hours", "core_hours", "cost"]


def measure(job, stage: str, records: list[dict], result: dict, warmup_steps: int) -> dict:
    """The measured columns of one point from its step log and the stage's result.json."""
    spec = getattr(job.stages, stage)
    timed = [r for r in records if r.get("step", 0) > warmup_steps and "perf/step_time_s" in r]
    if not timed:  # fewer steps than the warm-up: time what there is
        timed = [r for r in records if "perf/step_time_s" in r]
    if not timed:
        raise ValueError("the point logged no training steps")
    last = records[-1]
    step_time = float(np.mean([r["perf/step_time_s"] for r in timed]))
    workers, pp = job.cluster.num_workers, spec.deepspeed.pipeline_stages
    dp = workers // pp
    mfu = [r["perf/mfu"] for r in timed if r.get("perf/mfu") is not None]
    val = next((r["val/loss"] for r in reversed(records) if "val/loss" in r), None)
    return {
        "model": job.model.preset + ("" if not job.model.overrides else " " + _compact(job.model.overrides)),
        "params_m": round(result["params"] / 1e6, 3),
        "workers": workers, "pipeline_stages": pp, "data_parallel": dp, "zero_stage": spec.deepspeed.zero_stage,
        "micro_batch": spec.micro_batch, "grad_accum": spec.grad_accum, "global_batch": spec.micro_batch * spec.grad_accum * dp,
        "seq_len": result["seq_len"], "timed_steps": len(timed), "step_time_s": step_time,
        "tokens_per_s": result["tokens_per_step"] / step_time, "tokens_per_s_per_worker": result["tokens_per_step"] / step_time / workers,
        "achieved_tflops_per_worker": float(np.mean([r["perf/achieved_tflops_per_device"] for r in timed])),
        "mfu": float(np.mean(mfu)) if mfu else None,
        "peak_memory_gb_per_worker": max(result["perf/peak_memory_gb_per_rank"]),
        "final_loss": last.get("train/loss"), "val_loss": val,
        "train_flops": result["flops_per_token"] * result["tokens_seen"],
    }


def _compact(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def scaling_efficiency(rows: list[dict]) -> None:
    """Fill `efficiency` and `baseline` of measured rows, in place.

    The baseline of a model is its measured point with the fewest workers (the fastest of
    them on a tie). Efficiency is throughput per worker relative to it:
    (tokens/s / workers) / (baseline tokens/s / baseline workers). With the global batch held
    fixed (strong scaling) that is speed-up / worker ratio; with the per-worker batch held
    fixed (weak scaling) it is baseline step time / step time. 1.0 is perfect scaling.
    """
    measured = [r for r in rows if r["status"] == "measured"]
    for model in {r["model"] for r in measured}:
        same = [r for r in measured if r["model"] == model]
        base = min(same, key=lambda r: (r["workers"], -r["tokens_per_s"]))
        for r in same:
            r["efficiency"] = (r["tokens_per_s"] / r["workers"]) / (base["tokens_per_s"] / base["workers"])
            r["baseline"] = base["point"]


@dataclass(frozen=True)
class PowerLaw:
    """loss = coefficient * compute ** -exponent, fitted in log-log space."""

    coefficient: float
    exponent: float
    r2: float

    def __call__(self, compute):
        return self.coefficient * np.asarray(compute, dtype=float) ** -self.exponent


def fit_power_law(compute: list[float], loss: list[float]) -> PowerLaw:
    """Least squares on log(loss) = log(a) - b log(compute); needs two distinct compute values."""
    x, y = np.log(np.asarray(compute, dtype=float)), np.log(np.asarray(loss, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a power law needs points at two or more compute budgets")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    return PowerLaw(float(math.exp(intercept)), float(-slope), float(1 - (residual ** 2).sum() / total) if total else 1.0)


# ---- outputs -------------------------------------------------------------------------------

def columns_for(rows: list[dict], axes: list[str]) -> list[str]:
    """CSV columns: every column some measured row fills (no MFU column on a CPU-only sweep, no
    cost without a price), so a measured row has every column filled."""
    measured = [r for r in rows if r["status"] == "measured"]
    keep = [c for c in METRICS if any(r.get(c) is not None for r in measured)] if measured else METRICS
    return LEADING + [a for a in axes if a not in keep] + keep


def write_csv(rows: list[dict], axes: list[str], path: Path) -> list[str]:
    columns = columns_for(rows, axes)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _cell(r.get(c)) for c in columns})
    tmp.replace(path)
    return columns


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def best_per_model(rows: list[dict]) -> dict[str, str]:
    """model -> the point with the highest throughput."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["status"] == "measured" and (r["model"] not in best or r["tokens_per_s"] > best[r["model"]]["tokens_per_s"]):
            best[r["model"]] = r
    return {model: r["point"] for model, r in best.items()}


def write_report(sweep, rows: list[dict], axes: list[str], totals: dict, fit: PowerLaw | None, plots: list[str], path: Path) -> None:
    best = set(best_per_model(rows).values())
    order = {a: [*sweep.grid.get(a, []), *(p[a] for p in sweep.points if a in p)] for a in axes}
    measured = sorted((r for r in rows if r["status"] == "measured"), key=lambda r: [_sort_key(r.get(a), order[a]) for a in axes])
    gpu = any(r.get("mfu") is not None for r in measured)
    lines = [f"# Sweep {sweep.name}", "",
             f"Base job `{sweep.base}`, stage `{sweep.stage}`, {sweep.scaling} scaling"
             + (f" (global batch {sweep.global_batch})" if sweep.global_batch else "")
             + f"; {sweep.warmup_steps} warm-up step(s) not timed, "
             + (f"{sweep.steps} timed step(s) per point." if sweep.steps else "each point trains its own budget."), "",
             f"{len(measured)} point(s) measured, {sum(r['status'] == 'skipped' for r in rows)} skipped. "
             "The best configuration of each model (highest tokens/s) is in bold with ★.", ""]
    head = [*axes, "tokens/s", "tokens/s/worker", "efficiency", "step s", "MFU" if gpu else "TFLOP/s/worker", "peak GB/worker", "loss"]
    lines += ["| point | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for r in measured:
        cells = [str(r.get(a, "")) for a in axes] + [
            f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_worker']:,.0f}", f"{r['efficiency']:.2f}", f"{r['step_time_s']:.3f}",
            f"{r['mfu']:.1%}" if gpu else f"{r['achieved_tflops_per_worker']:.3f}", f"{r['peak_memory_gb_per_worker']:.2f}",
            f"{r['val_loss'] if r['val_loss'] is not None else r['final_loss']:.4f}"]
        star = r["point"] in best
        lines.append(f"| {'**' + r['point'] + '** ★' if star else r['point']} | " + " | ".join(f"**{c}**" if star else c for c in cells) + " |")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {r['point']} ({', '.join(f'{a}={r.get(a)}' for a in axes)}): {r['reason']}" for r in skipped]
    lines += ["", "## Cost", "", f"{totals['gpu_hours']:.4f} GPU-hours, {totals['core_hours']:.4f} core-hours"
              + (f", cost {totals['cost']:.4f}" if totals.get("cost") is not None else " (no price configured)") + "."]
    if fit is not None:
        lines += ["", "## Loss against compute", "", f"Fitted power law: loss = {fit.coefficient:.4g} x C^-{fit.exponent:.4f} "
                  f"(C in FLOPs, R² = {fit.r2:.3f})."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    write_text_atomically(path, "\n".join(lines) + "\n")


def _sort_key(value, listed: list):
    """The order the sweep file lists an axis's values in (tiny before gpt2-124m), then natural order."""
    if value in listed:
        return (0, listed.index(value), "")
    return (1, value, "") if isinstance(value, (int, float)) else (2, 0, str(value))


def write_plots(rows: list[dict], axes: list[str], fit: PowerLaw | None, out: Path) -> list[str]:
    """PNG plots next to the report; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "measured"]
    if not measured:
        return []
    series_axes = [a for a in axes if a != "workers"]
    series: dict[str, list[dict]] = {}
    for r in measured:
        series.setdefault(", ".join(f"{a}={r.get(a)}" for a in series_axes) or "all", []).append(r)
    written = []

    fig, (tput, eff) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, group in sorted(series.items()):
        group = sorted(group, key=lambda r: r["workers"])
        tput.plot([r["workers"] for r in group], [r["tokens_per_s"] for r in group], "o-", label=label)
        eff.plot([r["workers"] for r in group], [r["efficiency"] for r in group], "o-", label=label)
    for model in sorted({r["model"] for r in measured}):
        same = [r for r in measured if r["model"] == model]
        if len({r["workers"] for r in same}) < 2:
            continue  # one worker count: no line to draw
        base = next(r for r in same if r["point"] == same[0]["baseline"])
        xs = np.array(sorted({r["workers"] for r in same if r["workers"] >= base["workers"]}), dtype=float)
        tput.plot(xs, base["tokens_per_s"] / base["workers"] * xs, "k--", linewidth=1, label=f"ideal linear ({model})")
    eff.axhline(1.0, color="k", linestyle="--", linewidth=1, label="ideal")
    tput.set(xlabel="workers", ylabel="tokens/s", title="Throughput vs workers")
    eff.set(xlabel="workers", ylabel="efficiency (per-worker throughput vs baseline)", title="Scaling efficiency")
    ticks = sorted({r["workers"] for r in measured})
    for ax in (tput, eff):
        ax.set_xticks(ticks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "throughput_efficiency.png"))

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(measured) + 2), 4.5))
    ax.bar([r["point"] for r in measured], [r["peak_memory_gb_per_worker"] for r in measured], color="tab:blue")
    ax.set(xlabel="point", ylabel="GB (largest rank)", title="Peak memory per worker")
    ax.tick_params(axis="x", rotation=60)
    ax.grid(axis="y", alpha=0.3)
    written.append(_save(fig, out / "memory_per_worker.png"))

    if fit is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        pts = [(r["train_flops"], r["val_loss"] if r["val_loss"] is not None else r["final_loss"], r["model"]) for r in measured]
        for c, loss, model in pts:
            ax.loglog(c, loss, "o", label=model)
        xs = np.geomspace(min(p[0] for p in pts), max(p[0] for p in pts), 50)
        ax.loglog(xs, fit(xs), "k--", label=f"{fit.coefficient:.3g}·C^-{fit.exponent:.3f} (R²={fit.r2:.2f})")
        from matplotlib.ticker import ScalarFormatter

        for axis in (ax.yaxis,):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        ax.set(xlabel="training compute (FLOPs)", ylabel="final loss (validation when measured)", title="Loss vs compute")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "loss_vs_compute.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def loss_fit(rows: list[dict]) -> PowerLaw | None:
    """A power law when the sweep measured two or more models (a model-size sweep)."""
    measured = [r for r in rows if r["status"] == "measured"]
    if len({r["model"] for r in measured}) < 2:
        return None
    losses = [r["val_loss"] if r["val_loss"] is not None else r["final_loss"] for r in measured]
    try:
        return fit_power_law([r["train_flops"] for r in measured], losses)
    except ValueError:
        return None


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
