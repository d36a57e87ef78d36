"""Scaling experiments, measured: per-point throughput from the training loop's own step log,
scaling efficiency, device-hours and cost, a power-law fit of loss against compute, and the
report (results.csv, report.md, PNG plots).

Timing comes from the stage's step log (rank 0 logs every step of a sweep point): the mean step time
over the steps after warm-up. Rank 0's step time includes every collective of the step, so it
is the step time of the whole group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# Row columns in the order results.csv writes them; the axis columns come right after `reason`.
LEADING = ["point", "status", "reason"]
METRICS = ["model", "params_m", "workers", "pipeline_stages", "tensor_parallel", "sequence_parallel", "data_parallel", "zero_stage", "micro_batch", "grad_accum",
           "global_batch", "seq_len", "timed_steps", "step_time_s", "tokens_per_s", "tokens_per_s_per_worker",
           "achieved_tflops_per_worker", "mfu", "peak_memory_gb_per_worker", "final_loss", "val_loss", "train_flops",
           "efficiency", "baseline", "wall_s", "gpu_hours", "core_hours", "cost"]


def measure(plan, model: str, records: list[dict], result: dict, warmup_steps: int) -> dict:
    """The measured columns of one point from its TrainPlan, its step log and the stage's result.json."""
    timed = [r for r in records if r.get("step", 0) > warmup_steps and "perf/step_time_s" in r]
    if not timed:  # fewer steps than the warm-up: time what there is
        timed = [r for r in records if "perf/step_time_s" in r]
    if not timed:
        raise ValueError("the point logged no training steps")
    last = records[-1]
    step_time = float(np.mean([r["perf/step_time_s"] for r in timed]))
    mfu = [r["perf/mfu"] for r in timed if r.get("perf/mfu") is not None]
    val = next((r["val/loss"] for r in reversed(records) if "val/loss" in r), None)
    return {
        "model": model,
        "params_m": round(plan.model.num_params() / 1e6, 3),
        "workers": plan.world_size, "pipeline_stages": plan.pipeline_stages, "tensor_parallel": plan.tensor_parallel,
        "sequence_parallel": plan.sequence_parallel, "data_parallel": plan.data_parallel,
        "zero_stage": plan.zero_stage, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "global_batch": plan.global_batch,
        "seq_len": plan.seq_len, "timed_steps": len(timed), "step_time_s": step_time,
        "tokens_per_s": plan.tokens_per_step / step_time, "tokens_per_s_per_worker": plan.tokens_per_step / step_time / plan.world_size,
        "achieved_tflops_per_worker": float(np.mean([r["perf/achieved_tflops_per_device"] for r in timed])),
        "mfu": float(np.mean(mfu)) if mfu else None,
        "peak_memory_gb_per_worker": max(result["perf/peak_memory_gb_per_rank"]),
        "final_loss": last.get("train/loss"), "val_loss": val,
        "train_flops": result["flops_per_token"] * result["tokens_seen"],
    }


def model_label(model_spec) -> str:
    """A job's model as a sweep names it: the preset, plus any overrides."""
    overrides = model_spec.overrides
    return model_spec.preset + ("" if not overrides else " " + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())))


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
