"""Requests -> SageMaker's invocation figures: counts, 0/1 error rates, latency maps."""

from __future__ import annotations

import pytest

from agent.aggregation.aggregator import Aggregator, MetricKey, RequestTally
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


def test_model_errors_count_every_non_2xx_answer_but_a_client_leaving() -> None:
    tally = RequestTally()
    for status in (200, 204, 302, 404, 499, 408, 500, 502, 504, 101):
        tally.add(status, 10.0, 20.0)
    figures = dict(invocation_counts(tally, instance_count=1))
    # 302, 404, 500, 502 (proxy: model broke), 504 (proxy: model silent), 101
    assert figures["InvocationModelErrors"] == {1.0: 6, 0.0: 4}


def test_streamed_answers_give_first_byte_and_inter_chunk_distributions() -> None:
    tally = RequestTally()
    tally.add(200, 500_000.0, 501_000.0)
    tally.add_stream(150_000.4, [20_000.2, 19_999.6, 20_000.0])
    tally.add(200, 1000.0, 1100.0)  # not streamed
    tally.add_stream(149_999.9, None)  # one chunk only: no gap
    figures = dict(invocation_counts(tally, instance_count=1))
    assert figures["ModelTimeToFirstByte"] == {150_000.0: 2}
    assert figures["ModelInterChunkLatency"] == {20_000.0: 3}
    plain = RequestTally()
    plain.add(200, 1.0, 2.0)
    assert "ModelTimeToFirstByte" not in dict(invocation_counts(plain, 1))


def test_concurrency_second_sets_min_max_and_a_time_weighted_average() -> None:
    """A second of 0..8 in flight (mean 2.4), then half a second of 8 (a stop). The
    Average is the time mean over the 1.5 s, Sum the request-seconds, Minimum and Maximum
    the extremes reached between samples."""
    from agent.rules.invocation_metrics import concurrency_figures

    agg = Aggregator(60)
    key = MetricKey("N", "ConcurrentRequestsPerModel", (), "None")
    for low, high, mean, span in ((0, 8, 2.4, 1.0), (8, 8, 8.0, 0.5)):
        for value, weight in concurrency_figures(low, high, mean, span):
            agg.add(key, value, 1.0, weight=weight)
    stat = agg.close(60.0)[0].stats[key]
    assert (stat.count, stat.minimum, stat.maximum) == (1.5, 0, 8)
    assert stat.total == pytest.approx(6.4) and stat.total / stat.count == pytest.approx(6.4 / 1.5)
