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


def account(usages: list[Usage], prices: Prices) -> dict:
    """Per usage and in total: GPU-hours, core-hours and cost (None where no price applies)."""
    rows = {}
    for u in usages:
        rows[u.name] = {"seconds": round(u.seconds, 2), "workers": u.workers, "gpu_hours": round(u.gpu_hours, 6),
                        "core_hours": round(u.core_hours, 6), "cost": _round(prices.cost(u))}
    costs = [prices.cost(u) for u in usages]
    priced = [c for c in costs if c is not None]
    return {
        "unit": "GPU-hours" if any(u.gpus_per_worker > 0 for u in usages) else "core-hours",
        "gpu_hours": round(sum(u.gpu_hours for u in usages), 6),
        "core_hours": round(sum(u.core_hours for u in usages), 6),
        "price_per_gpu_hour": prices.per_gpu_hour,
        "price_per_core_hour": prices.per_core_hour,
        # A total only when every part had a price: a partial sum would understate the bill.
        "cost": _round(sum(priced)) if priced and len(priced) == len(costs) else None,
        "stages": rows,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
