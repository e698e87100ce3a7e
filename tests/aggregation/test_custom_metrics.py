"""StatsD samples in the aggregation stage: the custom-series cap, gauges, SageMaker's names."""

from __future__ import annotations

import time

from agent.aggregation.aggregator import Aggregator
from agent.aggregation.requests import OVERFLOW, RequestMetrics
from agent.model import ClosedInterval, Identity, Resource
from agent.rules.statsd import parse_datagram

IDENTITY = Identity(resource=Resource.ENDPOINT, endpoint_name="ep", variant_name="AllTraffic",
                    container_name=None, job_name="", host="i-0", start_epoch=0)


def feed(lines: list[str], *, cap: int = 1000, interval: int = 3600
         ) -> tuple[RequestMetrics, list[ClosedInterval]]:
    """Send `lines` as StatsD datagrams (chunks of 50) and close everything."""
    agg = Aggregator(interval)
    agg.close(time.time())
    metrics = RequestMetrics(agg, IDENTITY, namespace="NS", instance_count=1, proxy_on=False,
                             custom_series=cap)
    for at in range(0, len(lines), 50):
        samples, bad = parse_datagram("\n".join(lines[at:at + 50]).encode())
        assert bad == 0
        metrics.on_samples(samples)
    metrics.flush()
    return metrics, agg.close(time.time(), force=True)


def custom(closed: list[ClosedInterval]) -> dict[str, float]:
    """Sum per custom metric name over the closed intervals."""
    out: dict[str, float] = {}
    for interval in closed:
        assert not any(k.name.startswith("flood") or k.name == OVERFLOW for k in interval.stats)
        for key, stat in interval.custom.items():
            out[key.name] = out.get(key.name, 0.0) + stat.total
    return out


class TestCap:
    def test_distinct_names_beyond_the_cap_fold_into_one_count(self) -> None:
        """5,000 distinct names, cap 100: 100 series kept, the other 4,900 samples only counted
        in CustomMetricsOverflow (the fold used to keep each name)."""
        metrics, closed = feed([f"flood.{i}:1|c" for i in range(5000)], cap=100)
        sums = custom(closed)
        assert len(sums) == 101 and sums[OVERFLOW] == 4900
        assert metrics.counters()["custom_series_folded"] == 4900

    def test_series_are_name_times_dimensions_and_known_ones_keep_counting(self) -> None:
        """A series already admitted keeps its figures past the cap; new dimension values
        on a known name are new series."""
        lines = [f"hits:1|c|#shard:{i}" for i in range(3)] + ["hits:1|c|#shard:0"] * 5
        _, closed = feed(lines, cap=2)
        (interval,) = closed
        series = {(k.name, dict(k.dimensions).get("shard")): s.total
                  for k, s in interval.custom.items()}
        assert series == {("hits", "0"): 6.0, ("hits", "1"): 1.0, (OVERFLOW, None): 1.0}

    def test_the_cap_is_per_interval(self) -> None:
        """Each interval admits its own `custom_series` series."""
        agg = Aggregator(60)
        agg.close(0.0)
        metrics = RequestMetrics(agg, IDENTITY, namespace="NS", instance_count=1,
                                 proxy_on=False, custom_series=2)
        for start in (0.0, 60.0):
            for name in ("a", "b", "c"):
                metrics._custom_metric(parse_datagram(f"{name}{int(start)}:1|c".encode())[0][0],
                                       start + 1)
        closed = agg.close(121.0)
        assert [sorted(k.name for k in c.custom) for c in closed] == [
            [OVERFLOW, "a0", "b0"], [OVERFLOW, "a60", "b60"]]


class TestValues:
    def test_signed_gauges_change_the_last_value(self) -> None:
        """`+N` / `-N` move the gauge from its last value (not set it to N)."""
        _, closed = feed(["depth:10|g", "depth:+5|g", "depth:-3|g", "fresh:-2|g"])
        stat = next(s for k, s in closed[0].custom.items() if k.name == "depth")
        assert (stat.count, stat.minimum, stat.maximum, stat.total) == (3, 10, 15, 37)
        fresh = next(s for k, s in closed[0].custom.items() if k.name == "fresh")
        assert fresh.maximum == -2  # a delta on an unknown gauge starts from 0

    def test_sagemaker_latency_types_are_all_milliseconds(self) -> None:
        """ModelLatency:12 as |ms, |d and |h: 12,000 µs each; as |c it is refused."""
        metrics, closed = feed(["ModelLatency:12|ms", "ModelLatency:12|d", "ModelLatency:12|h",
                                "ModelLatency:12|c"])
        stats = [s for k, s in closed[0].stats.items() if k.name == "ModelLatency"]
        assert stats and all(s.values == {12_000.0: 3} for s in stats)
        assert metrics._aggregator.rejected.counts["latency_not_timer"] == 1

    def test_sample_rate_weighs_timers_and_scales_counters(self) -> None:
        """A timer at @0.5 stands for two samples; a counter at @0.5 for twice its value."""
        _, closed = feed(["t:4|ms|@0.5", "c:3|c|@0.5"])
        stats = {k.name: s for k, s in closed[0].custom.items()}
        assert stats["t"].count == 2 and stats["t"].values == {4.0: 2}
        assert stats["c"].total == 6

    def test_invalid_custom_metrics_counted_and_take_no_slot(self) -> None:
        """A figure the door refuses is counted by reason and does not use up the cap."""
        lines = ["bad:1e300|g", "tiny:1e-300|g", "ünï:1|c", "x:1|c|#k:a\tb", "dup:1|c|#EndpointName:x",
                 "ok:1|c"]
        metrics, closed = feed(lines, cap=1)
        assert sorted(k.name for k in closed[0].custom) == ["ok"]
        counts = metrics._aggregator.counters()
        assert counts["datums_rejected"] == 5
        for reason in ("value_too_large", "value_too_small", "metric_name_charset",
                       "dimension_value_charset", "dimension_duplicate"):
            assert counts[f"datums_rejected_{reason}"] == 1, reason
