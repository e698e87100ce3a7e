"""SageMaker's figures first: custom metrics never share a call with them and go first under
any bound of the metrics outbox (memory, and with a spool, what reaches the disk)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from agent.aggregation.aggregator import Aggregator
from agent.errors import DeliveryError
from agent.model import ClosedInterval, MetricKey
from agent.sinks.aws import AwsCaller
from agent.sinks.cloudwatch_metrics import (
    CloudWatchMetricsSink,
    CustomRequest,
    expendable,
)

DIMS = (("EndpointName", "e"), ("VariantName", "v"))


def interval(start: int, customs: int, values: int = 100, latencies: int = 0
             ) -> ClosedInterval:
    """Invocations (with `latencies` distinct ModelLatency values) plus `customs` custom
    distributions of `values` distinct values each."""
    agg = Aggregator(60)
    agg.close(float(start))
    agg.add(MetricKey("NS", "Invocations", DIMS, "None"), 1.0, start + 1.0)
    for v in range(latencies):
        agg.add(MetricKey("NS", "ModelLatency", DIMS, "Microseconds"), 1.0 + v, start + 1.0,
                distribution=True)
    for i in range(customs):
        key = MetricKey("NS", f"custom{i}", (*DIMS, ("shard", str(i))), "Milliseconds")
        for v in range(values):
            agg.add(key, 1.0 + v, start + 1.0, distribution=True, custom=True)
    (closed,) = agg.close(start + 61.0)
    return closed


def sink(tmp_path: Path | None = None, max_bytes: int = 1 << 20) -> CloudWatchMetricsSink:
    return CloudWatchMetricsSink(AwsCaller(send=False, file_sink=None, region=None),
                                 high_resolution=False, max_bytes=max_bytes,
                                 spool=tmp_path / "spool" if tmp_path else None,
                                 spool_max_bytes=64 << 20)


def queued(s: CloudWatchMetricsSink) -> list[dict[str, object]]:
    out = []
    while (batch := s.outbox.take()) is not None:
        out += batch.items
        s.outbox.done(batch)
    return out


def names(request: dict[str, object]) -> set[str]:
    return {d["MetricName"] for d in request["MetricData"]}  # type: ignore[attr-defined, index]


def test_custom_metrics_get_calls_of_their_own_after_sagemakers() -> None:
    """One interval with Invocations and 1,500 custom series: the first request holds only
    Invocations; every custom request is a CustomRequest with no SageMaker figure."""
    s = sink()
    s.submit([interval(60, customs=1500, values=1)])
    requests = queued(s)
    assert names(requests[0]) == {"Invocations"} and not expendable(requests[0])
    assert len(requests) >= 3
    for request in requests[1:]:
        assert isinstance(request, CustomRequest) and "Invocations" not in names(request)


def test_over_the_memory_bound_custom_requests_go_first() -> None:
    """No spool, a 1 MiB bound, 30 intervals each with ~0.15 MB of custom metrics during an
    outage: every custom request beyond the bound is dropped, all 30 Invocations stay."""
    s = sink(max_bytes=1 << 20)
    for n in range(30):
        s.submit([interval(60 * (n + 1), customs=60)])
    requests = queued(s)
    assert sum(1 for r in requests if names(r) == {"Invocations"}) == 30
    dropped = s.outbox.stats.dropped
    assert dropped["expendable"] > 0 and dropped["overflow"] == 0
    assert s.counters()["requests_dropped_expendable"] == dropped["expendable"]


def test_with_a_spool_only_sagemakers_requests_reach_the_disk(tmp_path: Path) -> None:
    """With a spool, over the bound the custom requests are dropped, not spilled: the spool
    (and its bound) is SageMaker's alone."""
    s = sink(tmp_path, max_bytes=256 << 10)
    for n in range(30):
        s.submit([interval(60 * (n + 1), customs=60, latencies=1500)])
    stats = s.outbox.stats
    assert stats.dropped["expendable"] > 0 and stats.spilled_items > 0
    requests = queued(s)
    sagemaker = [r for r in requests if "Invocations" in names(r)]
    assert len(sagemaker) == 30 and stats.dropped["overflow"] == stats.dropped["spool_full"] == 0
    restored = [r for r in requests if type(r) is dict]  # read back from the spool
    assert len(restored) >= stats.spilled_items > 0
    assert not any(name.startswith("custom") for r in restored for name in names(r))


def test_a_refused_call_is_reported_as_a_bug() -> None:
    """An invalid-parameter answer is an error line that asks for a bug report."""
    s = sink()
    s.submit([interval(60, customs=1, values=1)])
    batch = s.outbox.take()
    assert batch is not None
    with structlog.testing.capture_logs() as logs:
        s.dropped(batch.items, DeliveryError("PutMetricData failed: InvalidParameterValue: x",
                                             code="InvalidParameterValue", kind="invalid"))
    assert s.counters()["datums_dropped_invalid"] == 1
    (line,) = [e for e in logs if e["event"] == "metric_request_refused"]
    assert line["log_level"] == "error" and "please report" in line["bug"]
    assert line["code"] == "InvalidParameterValue" and "Invocations" in line["first_datum"]


def test_send_counts_custom_datums() -> None:
    """Sent custom datums are counted apart (self-telemetry of the cap's effect)."""
    s = sink()
    s.submit([interval(60, customs=3, values=1)])

    async def deliver() -> None:
        while (batch := s.outbox.take()) is not None:
            await s.send(batch.items, deadline=1e18)
            s.outbox.done(batch)

    asyncio.run(deliver())
    assert s.counters()["custom_datums_sent"] == 3 and s.counters()["datums_sent"] == 4
