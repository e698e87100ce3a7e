"""Readings -> SageMaker instance metrics (names, views, values in Percent), and the
arithmetic that makes each interval's CPU figure exact.

Scaled figures are summed (CPU: 0-100 per core, GPU: 0-100 per GPU), as SageMaker
publishes them for endpoints; the `...Normalized` ones divide by the cores or GPUs, so
they read 0-100 whatever the instance, as SageMaker publishes them for inference
components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

# CPU figures whose interval Average is computed from the kernel's counters at the interval's
# boundaries (`interval_rate`) rather than from the per-second samples.
CPU_METRICS = ("CPUUtilization", "CPUUtilizationNormalized")


class SystemFigures(Protocol):
    cpu_container_pct: float | None
    cpu_host_pct: float | None
    cores_container: float
    cores_host: int

    @property
    def mem_container_pct(self) -> float: ...
    @property
    def mem_host_pct(self) -> float: ...
    @property
    def disk_pct(self) -> float | None: ...


class GpuFigures(Protocol):
    utilization_pct: float | None

    @property
    def memory_pct(self) -> float: ...


class Figure(NamedTuple):
    """One instance metric value: `view` is "host" or "container"."""

    metric: str
    view: str
    value: float


def normalized(scaled: float, units: float) -> float:
    """A summed percentage (0-100 per core or GPU) -> 0-100 of all of them.

    Capped at 100: a CFS quota can be overrun briefly (burst), and one sample's window
    can be a few ms off; neither means more than all of the capacity was in use.
    """
    if units <= 0:
        return 0.0
    return min(100.0, max(0.0, scaled / units))


def cpu_figures(system: SystemFigures) -> list[Figure]:
    """CPUUtilization (0-100 x cores) and CPUUtilizationNormalized (0-100) for both views."""
    out: list[Figure] = []
    for view, pct, cores in (("host", system.cpu_host_pct, float(system.cores_host)),
                             ("container", system.cpu_container_pct, system.cores_container)):
        if pct is not None:
            out.append(Figure("CPUUtilization", view, pct))
            out.append(Figure("CPUUtilizationNormalized", view, normalized(pct, cores)))
    return out


def instance_figures(system: SystemFigures | None, gpus: Sequence[GpuFigures], *,
                     disk: bool = True) -> list[Figure]:
    """SageMaker's instance metrics from one sample.

    CPU is summed over cores (0-100 x cores); GPU and GPU memory are summed over
    GPUs (0-100 x GPUs) and absent without GPUs; memory and disk are 0-100. Each
    `...Normalized` figure is its scaled one over the cores or GPUs (0-100).
    GPUUtilization counts only the GPUs that report utilization (a MIG device does
    not) and is absent when none does. GPUs visible to the container are the same in
    both views.
    """
    out: list[Figure] = []
    if system is not None:
        out.extend(cpu_figures(system))
        out.append(Figure("MemoryUtilization", "host", system.mem_host_pct))
        out.append(Figure("MemoryUtilization", "container", system.mem_container_pct))
        disk_pct = system.disk_pct
        if disk and disk_pct is not None:
            out.append(Figure("DiskUtilization", "host", disk_pct))
            out.append(Figure("DiskUtilization", "container", disk_pct))
    if gpus:
        busy = [g.utilization_pct for g in gpus if g.utilization_pct is not None]
        memory = sum(g.memory_pct for g in gpus)
        for view in ("host", "container"):
            if busy:
                out.append(Figure("GPUUtilization", view, sum(busy)))
                out.append(Figure("GPUUtilizationNormalized", view,
                                  normalized(sum(busy), len(busy))))
            out.append(Figure("GPUMemoryUtilization", view, memory))
            out.append(Figure("GPUMemoryUtilizationNormalized", view,
                              normalized(memory, len(gpus))))
    return out


def next_tick(now: float, step: float, boundary: float | None = None) -> float:
    """The next sampling moment after `now` (Unix seconds): the next multiple of `step`,
    or of `boundary` (the publish interval) when that comes first.

    Sampling on the wall clock's multiples puts a reading on every interval boundary, so
    each interval's CPU figure is a difference of counters read at its own ends, and
    every instance of a fleet samples at the same moments.
    """
    tick = (math.floor(now / step) + 1) * step
    if boundary:
        tick = min(tick, (math.floor(now / boundary) + 1) * boundary)
    return tick


def counter_at(points: Sequence[tuple[float, float]], moment: float) -> float | None:
    """A cumulative counter's value at `moment`, interpolated linearly between the readings
    around it; None outside the readings' span. `points`: (time, value), time ascending."""
    if not points or moment < points[0][0] or moment > points[-1][0]:
        return None
    low, high = 0, len(points) - 1
    while high - low > 1:  # bisect on time
        mid = (low + high) // 2
        if points[mid][0] <= moment:
            low = mid
        else:
            high = mid
    (t0, v0), (t1, v1) = points[low], points[high]
    if t1 <= t0:
        return v0
    return v0 + (v1 - v0) * (min(moment, t1) - t0) / (t1 - t0)


class Rate(NamedTuple):
    """A counter's rate over a window, as a percentage (100 = one core busy)."""

    percent: float
    start: float
    end: float


def interval_rate(points: Sequence[tuple[float, float]], start: float, end: float) -> Rate | None:
    """A CPU-time counter (ns) over [start, end) as a percentage of one core.

    The window is clipped to the readings' span: an interval in which the agent started
    is measured from its first reading, and a final interval to its last. None when
    fewer than two readings fall in or around the window.
    """
    if len(points) < 2:
        return None
    low, high = max(start, points[0][0]), min(end, points[-1][0])
    if high <= low:
        return None
    first, last = counter_at(points, low), counter_at(points, high)
    if first is None or last is None:
        return None
    return Rate(max(0.0, (last - first) / 1e9 / (high - low) * 100.0), low, high)
