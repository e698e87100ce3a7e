"""Readings -> SageMaker instance metrics (names, views, values in Percent)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol


class SystemFigures(Protocol):
    cpu_container_pct: float | None
    cpu_host_pct: float | None

    @property
    def mem_container_pct(self) -> float: ...
    @property
    def mem_host_pct(self) -> float: ...
    @property
    def disk_pct(self) -> float | None: ...


class GpuFigures(Protocol):
    utilization_pct: float

    @property
    def memory_pct(self) -> float: ...


class Figure(NamedTuple):
    """One instance metric value: `view` is "host" or "container"."""

    metric: str
    view: str
    value: float


def instance_figures(system: SystemFigures | None, gpus: Sequence[GpuFigures], *,
                     disk: bool = True) -> list[Figure]:
    """SageMaker's instance metrics from one sample.

    CPU is summed over cores (0-100 x cores); GPU and GPU memory are summed over
    GPUs (0-100 x GPUs) and absent without GPUs; memory and disk are 0-100.
    GPUs visible to the container are the same in both views.
    """
    out: list[Figure] = []
    if system is not None:
        if system.cpu_host_pct is not None:
            out.append(Figure("CPUUtilization", "host", system.cpu_host_pct))
        if system.cpu_container_pct is not None:
            out.append(Figure("CPUUtilization", "container", system.cpu_container_pct))
        out.append(Figure("MemoryUtilization", "host", system.mem_host_pct))
        out.append(Figure("MemoryUtilization", "container", system.mem_container_pct))
        disk_pct = system.disk_pct
        if disk and disk_pct is not None:
            out.append(Figure("DiskUtilization", "host", disk_pct))
            out.append(Figure("DiskUtilization", "container", disk_pct))
    if gpus:
        util = sum(g.utilization_pct for g in gpus)
        memory = sum(g.memory_pct for g in gpus)
        for view in ("host", "container"):
            out.append(Figure("GPUUtilization", view, util))
            out.append(Figure("GPUMemoryUtilization", view, memory))
    return out
