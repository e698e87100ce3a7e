"""Aggregation: wall-clock intervals, statistics, closed on time, distributions bounded."""

from __future__ import annotations

import math

from agent.aggregate import MAX_DISTINCT_VALUES, Aggregator, MetricKey, round_relative

KEY = MetricKey("NS", "CPUUtilization", (("Host", "h"),), "Percent")


class TestAggregator:
    def test_statistics_per_aligned_interval(self) -> None:
        """Samples land in wall-clock-aligned intervals with count, sum, min, max."""
        agg = Aggregator(60)
        for t, v in ((120.0, 10), (150.0, 30), (179.9, 20), (180.0, 99)):
            agg.add(KEY, v, t)
        closed = agg.close(181.0)
        assert [c.start for c in closed] == [120]
        stat = closed[0].stats[KEY]
        assert (stat.count, stat.total, stat.minimum, stat.maximum) == (3, 60, 10, 30)

    def test_intervals_close_on_time_even_when_empty(self) -> None:
        """Every elapsed interval is closed, also those without samples."""
        agg = Aggregator(10)
        agg.close(100.0)
        agg.add(KEY, 1.0, 105.0)
        closed = agg.close(141.0)
        assert [c.start for c in closed] == [100, 110, 120, 130]
        assert [bool(c.stats) for c in closed] == [True, False, False, False]

    def test_force_closes_the_open_interval(self) -> None:
        """At shutdown the open interval is closed too."""
        agg = Aggregator(60)
        agg.add(KEY, 5.0, 61.0)
        assert [c.start for c in agg.close(62.0, force=True)] == [60]

    def test_non_finite_and_late_rejected(self) -> None:
        """NaN/inf are refused; samples for an already published interval are counted late."""
        agg = Aggregator(10)
        assert not agg.add(KEY, math.nan, 5.0) and not agg.add(KEY, math.inf, 5.0)
        agg.close(25.0)
        assert not agg.add(KEY, 1.0, 5.0) and agg.late == 1

    def test_distribution_bounded_with_small_error(self) -> None:
        """Past the distinct-value cap, values are rounded within 0.5 % relative error."""
        agg = Aggregator(60)
        for i in range(MAX_DISTINCT_VALUES * 3):
            agg.add(KEY, 1000.0 + i * 0.37, 1.0, distribution=True)
        stat = agg.close(61.0)[0].stats[KEY]
        assert stat.values is not None and len(stat.values) < MAX_DISTINCT_VALUES * 2
        assert sum(stat.values.values()) == MAX_DISTINCT_VALUES * 3
        for value in (1.0, 37.5, 1234.5, 9.9e6):
            assert abs(round_relative(value) - value) / value <= 0.005
