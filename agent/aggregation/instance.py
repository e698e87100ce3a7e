"""Instance readings -> SageMaker's instance metrics in the aggregator.

CPU is exact per interval: each interval's Average is the kernel's counters (cgroup
usage, /proc/stat) read at the interval's own boundaries, differenced; SampleCount
is the number of per-second samples in it and Sum = Average x SampleCount, so the
three agree; Minimum and Maximum are the per-second samples' (widened to take in
the Average, so Minimum <= Average <= Maximum always holds). The sampler reads the
counters on each boundary; a boundary value is interpolated between the readings
around it, and `flush` (run by the publisher just before it closes intervals) reads
the counters itself when the boundary's reading has not arrived yet.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence

from agent.aggregation.aggregator import Aggregator
from agent.log import first_or_every, get_logger
from agent.model import (
    CpuCounters,
    GpuReading,
    Identity,
    MetricKey,
    Resource,
    Statistic,
    SystemReading,
)
from agent.rules import naming
from agent.rules.instance_metrics import (
    CPU_METRICS,
    instance_figures,
    interval_rate,
    normalized,
)

_log = get_logger("instance")
VIEWS = ("host", "container")
MAX_POINTS = 10_000  # counter readings kept per view when no publisher prunes them


def with_average(samples: Statistic, average: float) -> Statistic:
    """The per-second samples' statistic with the interval's exact `average` in place:
    Sum = Average x SampleCount, Min/Max widened to hold the average."""
    return Statistic(count=samples.count, total=average * samples.count,
                     minimum=min(samples.minimum, average),
                     maximum=max(samples.maximum, average))


class InstanceFigures:
    """Turns each sample into CPU/memory/disk/GPU figures for both views (host, container).

    Args:
        aggregator: where the figures go.
        identity: for the namespace's resource and the dimensions.
        namespace: the configured root namespace.
        read_counters: reads the CPU counters now (cheap), for a boundary whose reading
            is not in yet when the interval closes; None to rely on the readings alone.
    """

    def __init__(self, aggregator: Aggregator, identity: Identity, namespace: str, *,
                 read_counters: Callable[[], CpuCounters] | None = None) -> None:
        self._aggregator = aggregator
        self._namespace = naming.instance_namespace(namespace, identity.resource)
        host_dims = naming.instance_dimension_sets(identity)
        self._dims = {"host": host_dims[0],
                      "container": host_dims[1] if len(host_dims) > 1 else None}
        self._disk = identity.resource is not Resource.TRANSFORM  # not for transform jobs
        self._read_counters = read_counters
        # Interval start -> (metric, view) -> per-second samples, until the interval closes.
        self._pending: dict[int, dict[tuple[str, str], Statistic]] = {}
        # Per view: (Unix seconds, cumulative CPU ns), time ascending, since the last close.
        self._points: dict[str, list[tuple[float, float]]] = {v: [] for v in VIEWS}
        self._cores = {"host": 1.0, "container": 1.0}
        self._closed_until = -math.inf
        self.samples = 0
        self.late = 0
        self.boundary_reads = 0

    def _key(self, metric: str, view: str) -> MetricKey | None:
        dims = self._dims[view]
        return None if dims is None else MetricKey(self._namespace, metric, dims, "Percent")

    def on_reading(self, system: SystemReading, gpus: Sequence[GpuReading]) -> None:
        """One sample of the system and GPUs."""
        self.samples += 1
        if system.counters is not None:
            self._mark(system.counters)
        self._cores = {"host": float(system.cores_host), "container": system.cores_container}
        for figure in instance_figures(system, gpus, disk=self._disk):
            key = self._key(figure.metric, figure.view)
            if key is None:
                continue
            if figure.metric in CPU_METRICS:
                self._cpu_sample(figure.metric, figure.view, figure.value, system)
            else:
                self._aggregator.add(key, figure.value, system.timestamp)

    def _cpu_sample(self, metric: str, view: str, value: float, system: SystemReading) -> None:
        """A per-second CPU rate counts in the interval that holds the middle of its window;
        one whose interval was published before it arrived (a loaded machine) counts in the
        first open interval instead (its CPU time is in the published Average already; here it
        only adds to SampleCount and Min/Max), so a short run never ends without a CPU figure."""
        middle = system.timestamp - (system.window_s or 0.0) / 2
        interval = self._aggregator.interval
        start = int(middle // interval) * interval
        if start < self._closed_until:
            self.late += 1
            if first_or_every(self.late):
                _log.warning("cpu_sample_late", late=self.late)
            start = int(self._closed_until)
        self._pending.setdefault(start, {}).setdefault((metric, view), Statistic()).add(value)

    def _mark(self, counters: CpuCounters) -> None:
        host = counters.host_busy_ns
        container = host if counters.cgroup_ns is None else float(counters.cgroup_ns)
        for view, value in (("host", host), ("container", container)):
            points = self._points[view]
            if points and counters.wall < points[-1][0] - 2 * self._aggregator.interval:
                points.clear()  # the wall clock stepped back: start over from here
            # In time order: a boundary read by `flush` may land before a reading that was
            # taken earlier but handed over later.
            bisect.insort(points, (counters.wall, value))
            self._thin(points)

    def _thin(self, points: list[tuple[float, float]]) -> None:
        """Keep only the readings a boundary value can come from: the one before and the one
        after each boundary, the first and the last; a reading with neighbours on both sides
        in its own interval is dropped (a few readings per interval, whatever the rate)."""
        interval = self._aggregator.interval
        if len(points) >= 3:
            (t0, _), (t1, _), (t2, _) = points[-3:]
            if len(points) > 3 and t0 // interval == t1 // interval == t2 // interval:
                del points[-2]
        if len(points) > MAX_POINTS:  # no publisher pruning them: keep memory bounded
            del points[:len(points) // 2]

    def flush(self) -> None:
        """Put each pending interval's exact CPU statistics into the aggregator: final for
        the intervals that have ended, provisional (up to the last reading) for the open
        one, so a forced close at shutdown still publishes it. Run just before closing."""
        now = time.time()
        interval = self._aggregator.interval
        for start in sorted(self._pending):
            end = start + interval
            ended = end <= now
            if ended and self._read_counters is not None and self._last_wall() < end:
                self._read_boundary()
            for (metric, view), samples in self._pending[start].items():
                key = self._key(metric, view)
                if key is None:
                    continue
                rate = interval_rate(self._points[view], start, end)
                # No counters around the interval (none read yet): the samples' own mean.
                value = rate.percent if rate is not None else samples.total / samples.count
                if metric != "CPUUtilization":
                    value = normalized(value, self._cores[view])
                self._aggregator.put(start, key, with_average(samples, value))
            if ended:
                del self._pending[start]
        # Every interval that ended is published now, with samples or without: a reading for
        # one of them that arrives later must not reopen it.
        self._closed_until = max(self._closed_until, int(now // interval) * interval)
        self._prune()

    def _read_boundary(self) -> None:
        """Read the counters now, for a boundary whose reading has not arrived."""
        try:
            counters = self._read_counters() if self._read_counters is not None else None
        except Exception as exc:  # noqa: BLE001 - publishing must go on: interpolate instead
            _log.warning("cpu_boundary_read_failed", error=repr(exc))
            return
        if counters is not None:
            self.boundary_reads += 1
            self._mark(counters)

    def _last_wall(self) -> float:
        points = self._points["host"]
        return points[-1][0] if points else -math.inf

    def _prune(self) -> None:
        """Keep the readings still needed: from the last one before the open intervals on."""
        for points in self._points.values():
            keep = 0
            while keep + 1 < len(points) and points[keep + 1][0] <= self._closed_until:
                keep += 1
            del points[:keep]

    def counters(self) -> dict[str, int]:
        return {"cpu_samples_late": self.late,
                "cpu_boundary_reads": self.boundary_reads}
