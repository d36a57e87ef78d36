"""The sweep's outputs: results.csv, report.md and the PNG plots, each written atomically."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from model.atomic import atomic_file, write_text_atomically
from pipelines.sweep.measure import LEADING, METRICS, PowerLaw

def columns_for(rows: list[dict], axes: list[str]) -> list[str]:
    """CSV columns: every column some measured row fills (no MFU column on a CPU-only sweep, no
    cost without a price), so a measured row has every column filled."""
    measured = [r for r in rows if r["status"] == "measured"]
    keep = [c for c in METRICS if any(r.get(c) is not None for r in measured)] if measured else METRICS
    return LEADING + [a for a in axes if a not in keep] + keep


def write_csv(rows: list[dict], axes: list[str], path: Path) -> list[str]:
    columns = columns_for(rows, axes)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _cell(r.get(c)) for c in columns})
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
    measured = [r for r in rows if r["status"] == "measured"]
    if not measured:
        return []
    written = [_plot_scaling(measured, axes, out / "throughput_efficiency.png"), _plot_memory(measured, out / "memory_per_worker.png")]
    if fit is not None:
        written.append(_plot_loss(measured, fit, out / "loss_vs_compute.png"))
    return written


def _plot_scaling(measured: list[dict], axes: list[str], path: Path) -> str:
    """Throughput and scaling efficiency against workers, one line per series of the other axes."""
    import matplotlib.pyplot as plt

    series_axes = [a for a in axes if a != "workers"]
    series: dict[str, list[dict]] = {}
    for r in measured:
        series.setdefault(", ".join(f"{a}={r.get(a)}" for a in series_axes) or "all", []).append(r)
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
    return _save(fig, path)


def _plot_memory(measured: list[dict], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(measured) + 2), 4.5))
    ax.bar([r["point"] for r in measured], [r["peak_memory_gb_per_worker"] for r in measured], color="tab:blue")
    ax.set(xlabel="point", ylabel="GB (largest rank)", title="Peak memory per worker")
    ax.tick_params(axis="x", rotation=60)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_loss(measured: list[dict], fit: PowerLaw, path: Path) -> str:
    """Final loss against training compute, log-log, with the fitted power law."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [(r["train_flops"], r["val_loss"] if r["val_loss"] is not None else r["final_loss"], r["model"]) for r in measured]
    for c, loss, model in pts:
        ax.loglog(c, loss, "o", label=model)
    xs = np.geomspace(min(p[0] for p in pts), max(p[0] for p in pts), 50)
    ax.loglog(xs, fit(xs), "k--", label=f"{fit.coefficient:.3g}·C^-{fit.exponent:.3f} (R²={fit.r2:.2f})")
    for axis in (ax.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set(xlabel="training compute (FLOPs)", ylabel="final loss (validation when measured)", title="Loss vs compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return str(path)
