"""PutMetricData packing, checked against botocore's own serializer."""

from __future__ import annotations

import boto3

from agent.aggregation.aggregator import Aggregator, MetricKey
from agent.rules.metric_data import (
    MAX_BODY_BYTES,
    MAX_DATUMS,
    MAX_VALUES_PER_DATUM,
    datum_problem,
    datums,
    split_metric_data,
)


def body_size(namespace: str, batch: list[dict[str, object]]) -> int:
    """The request body botocore would send, uncompressed, with the protocol it picks."""
    client = boto3.session.Session().client("cloudwatch", region_name="us-east-1")
    operation = client.meta.service_model.operation_model("PutMetricData")
    request = client._serializer.serialize_to_request(  # noqa: SLF001 - the real serializer
        {"Namespace": namespace, "MetricData": batch}, operation)
    body = request["body"]
    return len(body if isinstance(body, bytes) else body.encode())


def keys(n: int, dims: int = 3) -> list[MetricKey]:
    return [MetricKey("NS", f"Metric{i}", tuple((f"Dim{d}", f"value-{i}-{d}" * 4)
                                                 for d in range(dims)), "Percent") for i in range(n)]


class TestDatums:
    def test_statistic_set_and_resolution(self) -> None:
        """Plain metrics carry StatisticValues; high resolution sets StorageResolution=1."""
        agg = Aggregator(60)
        agg.add(keys(1)[0], 40.0, 61.0)
        agg.add(keys(1)[0], 60.0, 62.0)
        (datum,) = datums(agg.close(121.0)[0], high_resolution=True)["NS"]
        assert datum["StatisticValues"] == {"SampleCount": 2, "Sum": 100, "Minimum": 40, "Maximum": 60}
        assert datum["StorageResolution"] == 1 and datum["Unit"] == "Percent"

    def test_distribution_split_at_150_values(self) -> None:
        """A distribution with more than 150 distinct values spans several datums."""
        agg = Aggregator(60)
        key = MetricKey("NS", "ModelLatency", (("EndpointName", "e"),), "Microseconds")
        for v in range(400):
            agg.add(key, float(v), 61.0, distribution=True)
        items = datums(agg.close(121.0)[0], high_resolution=False)["NS"]
        assert [len(d["Values"]) for d in items] == [150, 150, 100]
        assert sum(sum(d["Counts"]) for d in items) == 400
        assert all(len(d["Values"]) <= MAX_VALUES_PER_DATUM for d in items)


class TestSplit:
    def test_fewest_calls_by_count(self) -> None:
        """2,500 small datums -> ceil(2500/1000) = 3 calls."""
        agg = Aggregator(60)
        for key in keys(2500, dims=1):
            agg.add(key, 1.0, 61.0)
        items = datums(agg.close(121.0)[0], high_resolution=False)["NS"]
        assert [len(b) for b in split_metric_data("NS", items)] == [1000, 1000, 500]

    def test_bytes_measured_against_botocore(self) -> None:
        """Big distribution datums are cut by bytes; every body is within 1 MB as botocore sends it."""
        agg = Aggregator(60)
        for key in keys(1000, dims=10):
            for v in range(150):
                agg.add(key, 1000.123456 + v, 61.0, distribution=True)
        items = datums(agg.close(121.0)[0], high_resolution=False)["NS"]
        batches = split_metric_data("NS", items)
        assert len(batches) > 1
        sizes = [body_size("NS", b) for b in batches]
        assert max(sizes) <= MAX_BODY_BYTES
        assert all(len(b) <= MAX_DATUMS for b in batches)
        # Packed tightly: every call but the last is at least 90 % full.
        assert all(size >= 0.9 * MAX_BODY_BYTES for size in sizes[:-1])


class TestCustomApart:
    def test_custom_figures_make_datums_of_their_own(self) -> None:
        """`datums` gives SageMaker's figures, or with `custom=True` the custom ones: never
        both from one call, so a custom metric cannot cost Invocations their call."""
        agg = Aggregator(60)
        agg.close(60.0)
        sagemaker = MetricKey("NS", "Invocations", (("EndpointName", "e"),), "None")
        agg.add(sagemaker, 1.0, 61.0)
        agg.add(sagemaker._replace(name="queue_depth"), 3.0, 61.0, custom=True)
        (closed,) = agg.close(121.0)
        assert [d["MetricName"] for d in datums(closed, high_resolution=False)["NS"]] == [
            "Invocations"]
        assert [d["MetricName"] for d in datums(closed, high_resolution=False,
                                                custom=True)["NS"]] == ["queue_depth"]

    def test_last_guard_names_what_the_api_would_refuse(self) -> None:
        """`datum_problem` checks a finished datum against the API's own bounds."""
        good = {"MetricName": "m", "Unit": "Count", "Dimensions": [{"Name": "d", "Value": "v"}],
                "StatisticValues": {"SampleCount": 1, "Sum": 1e100, "Minimum": 0, "Maximum": 1}}
        assert datum_problem("NS", good) is None
        assert datum_problem("NS", {**good, "StatisticValues": {
            **good["StatisticValues"], "Sum": 1e200}}) == "value_too_large"
        assert datum_problem("NS", {**good, "Values": [1e-200], "Counts": [1]}) == "value_too_small"
        assert datum_problem("NS", {**good, "MetricName": "é"}) == "metric_name_charset"
