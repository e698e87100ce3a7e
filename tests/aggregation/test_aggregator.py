"""Aggregation: wall-clock intervals, statistics, closed on time, distributions bounded."""

from __future__ import annotations

import math

import structlog

from agent.aggregation.aggregator import (
    MAX_DISTINCT_VALUES,
    Aggregator,
    MetricKey,
    round_relative,
)

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

    def test_interval_just_published_is_not_published_again(self) -> None:
        """A figure for the interval that was just closed is late: counted, never re-opened
        (it used to be published a second time at the next close)."""
        agg = Aggregator(60)
        agg.close(60.0)
        agg.add(KEY, 1.0, 61.0)
        (first,) = agg.close(121.0)
        assert first.start == 60 and first.stats[KEY].count == 1
        assert not agg.add(KEY, 2.0, 119.0)  # 60..120, already published
        agg.merge(60, [(KEY, (3.0, 4), False)])  # a tally for it too: 4 figures
        assert agg.late == 5
        closed = agg.close(181.0)
        assert [c.start for c in closed] == [120] and not closed[0].stats

    def test_late_after_forced_close(self) -> None:
        """After the shutdown close, the interval it published takes nothing more."""
        agg = Aggregator(60)
        agg.close(60.0)
        agg.add(KEY, 1.0, 61.0)
        assert [c.start for c in agg.close(70.0, force=True)] == [60]
        assert not agg.add(KEY, 1.0, 71.0) and agg.late == 1
        assert all(not c.stats for c in agg.close(200.0, force=True))

    def test_custom_figures_kept_apart(self) -> None:
        """Custom (StatsD) figures close into `custom`, never into SageMaker's `stats`."""
        agg = Aggregator(60)
        custom = KEY._replace(name="queue_depth")
        agg.add(KEY, 1.0, 61.0)
        agg.add(custom, 5.0, 61.0, custom=True)
        (closed,) = agg.close(121.0)
        assert list(closed.stats) == [KEY] and list(closed.custom) == [custom]

    def test_refusals_logged_with_an_example_at_most_once_a_minute(self) -> None:
        """10,000 refused figures make one log line per reason and minute, with an example
        whose control and non-ASCII characters are escaped."""
        agg = Aggregator(60)
        bad = KEY._replace(name="b\u00e4d\x07")
        with structlog.testing.capture_logs() as logs:
            for i in range(10_000):
                agg.add(bad, 1.0, 100.0 + i * 0.001)
                agg.add(KEY, 1e300, 100.0 + i * 0.001)
            agg.add(bad, 1.0, 161.0)
        lines = [e for e in logs if e["event"] == "metric_datum_rejected"]
        assert [e["reason"] for e in lines] == [
            "metric_name_charset", "value_too_large", "metric_name_charset"]
        assert lines[0]["example"]["name"] == "b\\xe4d\\x07" and lines[2]["rejected"] == 10_001
        assert agg.counters()["datums_rejected"] == 20_001
