"""What a run cost: device-hours reserved per stage, and money at a configured price.

A stage holds its workers' resources for its whole wall time (start-up, data loading and
evaluation included), so that is what is billed: seconds x workers x GPUs (or CPU cores) per
worker. GPU-hours are the unit when a stage holds GPUs; on a CPU-only run the unit is
core-hours. Prices are per GPU-hour and per core-hour; an unset price gives no money figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """The resources one stage (or one sweep point) held, and for how long."""

    name: str
    seconds: float
    workers: int
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.workers * self.gpus_per_worker / 3600.0

    @property
    def core_hours(self) -> float:
        return self.seconds * self.workers * self.cpus_per_worker / 3600.0


@dataclass(frozen=True)
class Prices:
    per_gpu_hour: float | None = None
    per_core_hour: float | None = None

    def cost(self, usage: Usage) -> float | None:
        """Money for one usage: its GPU-hours when it held GPUs, else its core-hours."""
        if usage.gpus_per_worker > 0:
            return None if self.per_gpu_hour is None else usage.gpu_hours * self.per_gpu_hour
        return None if self.per_core_hour is None else usage.core_hours * self.per_core_hour


def stage_usage(stage: str, seconds: float, cluster, eval_pool=None, data_workers: int = 1) -> Usage:
    """The resources a stage holds while it runs: a training stage its workers (`cluster`: the
    job's cluster settings), the eval stage its generation pool (`eval_pool`: the eval stage's
    settings), data preparation `data_workers` tasks of one CPU."""
    if stage in ("pretrain", "sft", "dpo"):
        return Usage(stage, seconds, cluster.num_workers, cluster.gpus_per_worker, cluster.cpus_per_worker)
    if stage == "eval":
        return Usage(stage, seconds, eval_pool.workers, eval_pool.gpus_per_worker, eval_pool.cpus_per_worker)
    return Usage(stage, seconds, data_workers, 0.0, 1.0)


def account(usages: list[Usage], prices: Prices) -> dict:
    """Per usage and in total: GPU-hours, core-hours and cost (None where no price applies)."""
    rows = {}
    for u in usages:
        rows[u.name] = {"seconds": round(u.seconds, 2), "workers": u.workers, "gpu_hours": round(u.gpu_hours, 6),
                        "core_hours": round(u.core_hours, 6), "cost": _round(prices.cost(u))}
    total = totals([{"gpu_hours": u.gpu_hours, "core_hours": u.core_hours, "cost": prices.cost(u)} for u in usages])
    return {**total, "gpu_hours": round(total["gpu_hours"], 6), "core_hours": round(total["core_hours"], 6),
            "cost": _round(total["cost"]), "price_per_gpu_hour": prices.per_gpu_hour,
            "price_per_core_hour": prices.per_core_hour, "stages": rows}


def totals(parts: list[dict]) -> dict:
    """The unit, GPU-hours, core-hours and cost summed over parts (each with those three keys)."""
    costs = [p["cost"] for p in parts]
    return {
        "unit": "GPU-hours" if any(p["gpu_hours"] > 0 for p in parts) else "core-hours",
        "gpu_hours": sum(p["gpu_hours"] for p in parts),
        "core_hours": sum(p["core_hours"] for p in parts),
        # A total only when every part had a price: a partial sum would understate the bill.
        "cost": sum(costs) if costs and None not in costs else None,
    }


def describe_usage(cost: dict) -> str:
    """One line for a person: `0.1555 core-hours, cost 0.0078` (the cost only where priced)."""
    hours = cost["gpu_hours"] if cost["unit"] == "GPU-hours" else cost["core_hours"]
    return f"{hours:.4f} {cost['unit']}" + (f", cost {cost['cost']:.4f}" if cost.get("cost") is not None else "")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
