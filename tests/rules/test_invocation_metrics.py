"""Requests -> SageMaker's invocation figures: counts, 0/1 error rates, latency maps."""

from __future__ import annotations

from agent.aggregate import Aggregator, MetricKey, RequestTally
from agent.rules.invocation_metrics import invocation_counts


def test_counts_rates_and_latencies() -> None:
    tally = RequestTally()
    for status, model, container in ((200, 1000.4, 1500.0), (404, 10.0, 30.0),
                                     (503, 2000.0, 1999.0), (200, 1000.0, None)):
        tally.add(status, model, container)
    figures = dict(invocation_counts(tally, instance_count=4))
    assert figures["Invocations"] == (1.0, 4) and figures["InvocationsPerInstance"] == (0.25, 4)
    assert figures["Invocation4XXErrors"] == {1.0: 1, 0.0: 3}
    assert figures["Invocation5XXErrors"] == {1.0: 1, 0.0: 3}
    assert figures["ModelLatency"] == {1000.0: 2, 10.0: 1, 2000.0: 1}
    assert figures["ContainerLatency"] == {1500.0: 1, 30.0: 1, 1999.0: 1}
    assert figures["OverheadLatency"] == {500.0: 1, 20.0: 1, 0.0: 1}  # never negative


def test_merged_statistics_are_what_cloudwatch_would_compute() -> None:
    tally = RequestTally()
    for _ in range(9):
        tally.add(200, 100.0, None)
    tally.add(500, 300.0, None)
    agg = Aggregator(60)
    keys = {m: MetricKey("N", m, (), "None") for m, _ in invocation_counts(tally, 1)}
    agg.merge(0, [(keys[m], counted, m == "ModelLatency")
                  for m, counted in invocation_counts(tally, 1)])
    stats = agg.close(60.0)[0].stats
    errors = stats[keys["Invocation5XXErrors"]]
    assert (errors.count, errors.total, errors.minimum, errors.maximum) == (10, 1, 0, 1)
    model = stats[keys["ModelLatency"]]
    assert model.values == {100.0: 9, 300.0: 1} and model.total == 1200
    ok = stats[keys["Invocation4XXErrors"]]
    assert (ok.count, ok.total, ok.maximum) == (10, 0, 0)  # no error: max stays 0


def test_no_requests_no_figures() -> None:
    assert invocation_counts(RequestTally(), 1) == []
