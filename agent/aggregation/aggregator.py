"""Aggregation per publish interval: SampleCount, Sum, Min, Max and a value->count map.

Intervals are aligned to the wall clock (a 60 s interval closes on the minute)
so every instance of a fleet publishes the same timestamps. `close(now)` returns
every interval that has ended, also those in which nothing was recorded. Synchronous
and clock-free: `now` is a parameter.

This is the door of the CloudWatch path: every figure is checked against
CloudWatch's rules here (`agent.rules.validation`) and what fails is dropped and
counted by reason, with a log line showing an example (the first of each reason,
then at most one a minute), so no PutMetricData call can be refused for its
content. A figure for an interval already published is late: counted, never
published a second time. Custom (StatsD) figures are kept apart from SageMaker's
(`ClosedInterval.custom`) so that they never share a call with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from agent.log import get_logger
from agent.model import (
    MAX_DISTINCT_VALUES,
    ClosedInterval,
    MetricKey,
    RequestTally,
    Statistic,
    round_relative,
)
from agent.rules.validation import REASONS, key_problem, value_problem

__all__ = ["MAX_DISTINCT_VALUES", "Aggregator", "ClosedInterval", "MetricKey", "Rejections",
           "RequestTally", "Statistic", "round_relative"]

LOG_EVERY_S = 60.0  # after the first line of a reason, at most one line a minute for it

_log = get_logger("aggregation")


@dataclass(slots=True)
class Rejections:
    """Figures refused at the door, counted by reason, with a rate-limited log line."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    _logged_at: dict[str, float] = field(default_factory=dict)

    def note(self, reason: str, key: MetricKey, value: float, now: float, count: int = 1) -> None:
        """Count `count` figures refused for `reason`; log one example now and then."""
        total = self.counts.get(reason, 0) + count
        self.counts[reason] = total
        last = self._logged_at.get(reason)
        if last is None or abs(now - last) >= LOG_EVERY_S:
            self._logged_at[reason] = now
            _log.warning("metric_datum_rejected", reason=reason, rejected=total,
                         example=_example(key, value),
                         then="dropped: CloudWatch would refuse the whole call")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _shown(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, control and non-ASCII characters escaped."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _example(key: MetricKey, value: float) -> dict[str, object]:
    """A short, printable description of a refused figure for the log line."""
    return {"namespace": _shown(key.namespace, 100), "name": _shown(key.name, 100),
            "dimensions": {_shown(n, 60): _shown(v, 100) for n, v in key.dimensions[:10]},
            "dimension_count": len(key.dimensions), "unit": _shown(key.unit, 40),
            "value": repr(value)}


@dataclass(slots=True)
class Aggregator:
    """Accumulates figures into wall-clock-aligned intervals of `interval` seconds."""

    interval: int
    _open: dict[int, dict[MetricKey, Statistic]] = field(default_factory=dict)
    _custom: dict[int, dict[MetricKey, Statistic]] = field(default_factory=dict)
    _next_close: int | None = None  # start of the oldest interval not yet published
    late: int = 0
    rejected: Rejections = field(default_factory=Rejections)

    def add(self, key: MetricKey, value: float, now: float, *, distribution: bool = False,
            weight: float = 1.0, custom: bool = False) -> bool:
        """Record a figure at time `now`; False (and counted) if it breaks CloudWatch's rules
        or its interval was already published. `custom`: a custom (StatsD) metric, published
        in calls of its own."""
        problem = value_problem(value)
        if problem is not None:
            self.rejected.note(problem, key, value, now)
            return False
        start = int(now // self.interval) * self.interval
        if self._next_close is not None and start < self._next_close:
            self.late += 1
            return False
        bucket = (self._custom if custom else self._open).setdefault(start, {})
        stat = bucket.get(key)
        if stat is None:
            problem = key_problem(key)  # once per metric and interval
            if problem is not None:
                self.rejected.note(problem, key, value, now)
                return False
            stat = bucket[key] = Statistic(values={} if distribution else None)
        stat.add(value, weight)
        return True

    def merge(self, start: int, figures: list[tuple[MetricKey, dict[float, int] | tuple[
            float, float], bool]]) -> None:
        """Add pre-counted figures to the interval starting at `start`: (key, {value: count},
        True) for distributions, (key, (value, count), False) for a value seen count times.
        Checked like `add`; an interval already published takes nothing (counted late)."""
        if self._next_close is not None and start < self._next_close:
            self.late += sum(
                int(sum(c.values())) if isinstance(c, dict) else int(c[1]) for _, c, _ in figures)
            return
        bucket = self._open.setdefault(start, {})
        for key, counted, distribution in figures:
            pairs = counted.items() if isinstance(counted, dict) else (counted,)
            stat = bucket.get(key)
            if stat is None:
                problem = key_problem(key)
                if problem is not None:
                    self.rejected.note(problem, key, math.nan, float(start),
                                       count=int(sum(c for _, c in pairs)))
                    continue
                stat = bucket[key] = Statistic(values={} if distribution else None)
            for value, count in pairs:
                if not count:
                    continue
                problem = value_problem(value)
                if problem is not None:
                    self.rejected.note(problem, key, value, float(start), count=int(count))
                    continue
                stat.add(value, count)

    def put(self, start: int, key: MetricKey, stat: Statistic) -> bool:
        """Set `key`'s whole statistic in the interval starting at `start`, replacing any (a
        figure computed as a whole: the exact interval CPU). Checked like `add`; False (and
        counted) when refused or when that interval was already published."""
        if self._next_close is not None and start < self._next_close:
            self.late += 1
            return False
        for value in (stat.total, stat.minimum, stat.maximum):
            problem = value_problem(value)
            if problem is not None:
                self.rejected.note(problem, key, value, float(start))
                return False
        problem = key_problem(key)
        if problem is not None:
            self.rejected.note(problem, key, stat.total, float(start))
            return False
        self._open.setdefault(start, {})[key] = stat
        return True

    def close(self, now: float, *, force: bool = False) -> list[ClosedInterval]:
        """Intervals that ended by `now` (all open ones with `force`, for shutdown)."""
        current = int(now // self.interval) * self.interval
        if self._next_close is None:
            self._next_close = current
        out = []
        starts = set(self._open) | set(self._custom) | set(
            range(self._next_close, current, self.interval))
        for start in sorted(starts):
            if start < current or force:
                out.append(ClosedInterval(start, self.interval, self._open.pop(start, {}),
                                          custom=self._custom.pop(start, {})))
        self._next_close = max(self._next_close, current + (self.interval if force else 0))
        return out

    def next_close_at(self, now: float) -> float:
        """When the interval open at `now` ends."""
        return (int(now // self.interval) + 1) * self.interval

    def counters(self) -> dict[str, int]:
        """Late figures and figures refused at the door, by reason."""
        return {"late_samples": self.late, "datums_rejected": self.rejected.total,
                **{f"datums_rejected_{k}": v for k, v in self.rejected.counts.items()}}
