"""Aggregation per publish interval: SampleCount, Sum, Min, Max and a value->count map.

Intervals are aligned to the wall clock (a 60 s interval closes on the minute)
so every instance of a fleet publishes the same timestamps. `close(now)` returns
every interval that has ended, also those in which nothing was recorded. Pure and
synchronous: no I/O, `now` is a parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.model import Dimensions

# Distinct values kept per statistic before values are rounded to a coarser grid.
# Each datum carries at most 150 (PutMetricData); more are split across datums.
MAX_DISTINCT_VALUES = 1500
# Relative precision of the rounding grid when a distribution overflows.
ROUNDING_RELATIVE_ERROR = 0.005


class MetricKey(NamedTuple):
    """What a figure is: namespace, name, dimensions, unit."""

    namespace: str
    name: str
    dimensions: Dimensions
    unit: str


@dataclass(slots=True)
class Statistic:
    """Statistics of one metric over one interval."""

    count: float = 0.0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    values: dict[float, float] | None = None

    def add(self, value: float, weight: float = 1.0) -> None:
        self.count += weight
        self.total += value * weight
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        if self.values is not None:
            if len(self.values) >= MAX_DISTINCT_VALUES and value not in self.values:
                value = round_relative(value)
            self.values[value] = self.values.get(value, 0.0) + weight


def round_relative(value: float, error: float = ROUNDING_RELATIVE_ERROR) -> float:
    """Round to a logarithmic grid whose relative error is at most `error`."""
    if value <= 0:
        return value
    base = 1.0 + 2 * error
    return base ** round(math.log(value, base))


@dataclass(frozen=True, slots=True)
class ClosedInterval:
    """Everything recorded between `start` and `start + length` (Unix seconds)."""

    start: int
    length: int
    stats: dict[MetricKey, Statistic]


@dataclass(slots=True)
class Aggregator:
    """Accumulates figures into wall-clock-aligned intervals of `interval` seconds."""

    interval: int
    _open: dict[int, dict[MetricKey, Statistic]] = field(default_factory=dict)
    _next_close: int | None = None
    late: int = 0

    def add(self, key: MetricKey, value: float, now: float, *, distribution: bool = False,
            weight: float = 1.0) -> bool:
        """Record a figure at time `now`; False (and counted) if it is not finite or late."""
        if not math.isfinite(value):
            return False
        start = int(now // self.interval) * self.interval
        if self._next_close is not None and start < self._next_close - self.interval:
            self.late += 1
            return False
        bucket = self._open.setdefault(start, {})
        stat = bucket.get(key)
        if stat is None:
            stat = bucket[key] = Statistic(values={} if distribution else None)
        stat.add(value, weight)
        return True

    def merge(self, start: int, figures: list[tuple[MetricKey, dict[float, int] | tuple[
            float, float], bool]]) -> None:
        """Add pre-counted figures to the interval starting at `start`: (key, {value: count},
        True) for distributions, (key, (value, count), False) for a value seen count times."""
        bucket = self._open.setdefault(start, {})
        for key, counted, distribution in figures:
            stat = bucket.get(key)
            if stat is None:
                stat = bucket[key] = Statistic(values={} if distribution else None)
            pairs = counted.items() if isinstance(counted, dict) else (counted,)
            for value, count in pairs:
                if count:
                    stat.add(value, count)

    def close(self, now: float, *, force: bool = False) -> list[ClosedInterval]:
        """Intervals that ended by `now` (all open ones with `force`, for shutdown)."""
        current = int(now // self.interval) * self.interval
        if self._next_close is None:
            self._next_close = current
        out = []
        for start in sorted(set(self._open) | set(range(self._next_close, current, self.interval))):
            if start < current or force:
                out.append(ClosedInterval(start, self.interval, self._open.pop(start, {})))
        self._next_close = max(self._next_close, current + (self.interval if force else 0))
        return out

    def next_close_at(self, now: float) -> float:
        """When the interval open at `now` ends."""
        return (int(now // self.interval) + 1) * self.interval


@dataclass(slots=True)
class RequestTally:
    """Requests of one interval, kept compactly: counts and latency value -> count maps.

    A request costs a few dict updates here (the hook and StatsD path must take
    100,000 a second); `Aggregator.merge` turns a tally into the usual statistics
    once per interval.
    """

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    model: dict[float, int] = field(default_factory=dict)
    container: dict[float, int] = field(default_factory=dict)
    overhead: dict[float, int] = field(default_factory=dict)

    def add(self, status: int, model_us: float, container_us: float | None) -> None:
        self.requests += 1
        if status >= 500:
            self.errors_5xx += 1
        elif status >= 400:
            self.errors_4xx += 1
        model = float(round(model_us))
        self.model[model] = self.model.get(model, 0) + 1
        if container_us is not None:
            container = float(round(container_us))
            self.container[container] = self.container.get(container, 0) + 1
            overhead = max(0.0, container - model)
            self.overhead[overhead] = self.overhead.get(overhead, 0) + 1
