"""Closed intervals -> PutMetricData requests within the API limits.

PutMetricData (CloudWatch API reference): at most 1,000 datums and 1 MB of request
body per call, at most 150 distinct Values per datum, 30 dimensions, no NaN or
infinity, one namespace per call. The body size is measured, not estimated: each
datum is serialized exactly as botocore's JSON protocol does (`json.dumps` with its
default separators, timestamps as integer epoch seconds; a test compares with
botocore's own serializer), and a request is cut before it would pass the budget.

An interval's custom (StatsD) figures become datums of their own (`datums(...,
custom=True)`) so that they are sent in calls of their own: a custom metric can
never cost SageMaker's figures their call. Every figure was checked against
CloudWatch's rules when it entered aggregation; `datum_problem` checks the finished
datum once more, as a last guard (a datum that fails it is a bug of the agent).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from agent.model import ClosedInterval, MetricKey, Statistic
from agent.rules.validation import key_problem, number_problem

MAX_DATUMS = 1000
# 1 MB is the documented limit (measured on the uncompressed body by the CloudWatch
# agent too); keep a margin for the JSON envelope and headers.
MAX_BODY_BYTES = 1_000_000
MAX_VALUES_PER_DATUM = 150
MAX_DIMENSIONS = 30

Datum = dict[str, Any]


def datums(interval: ClosedInterval, *, high_resolution: bool, custom: bool = False
           ) -> dict[str, list[Datum]]:
    """PutMetricData datums for one interval, grouped by namespace: SageMaker's figures, or
    with `custom` the custom ones (which must not share a call with them)."""
    stamp = datetime.fromtimestamp(interval.start, UTC)
    out: dict[str, list[Datum]] = {}
    stats = interval.custom if custom else interval.stats
    for key, stat in sorted(stats.items(), key=lambda kv: kv[0]):
        if stat.count <= 0:
            continue
        out.setdefault(key.namespace, []).extend(
            _datums_for(key, stat, stamp, high_resolution))
    return out


def _datums_for(key: MetricKey, stat: Statistic, stamp: datetime, high_resolution: bool
                ) -> Iterable[Datum]:
    base: Datum = {
        "MetricName": key.name,
        "Dimensions": [{"Name": n, "Value": v} for n, v in key.dimensions[:MAX_DIMENSIONS]],
        "Timestamp": stamp,
        "Unit": key.unit,
    }
    if high_resolution:
        base["StorageResolution"] = 1
    statistic = {"SampleCount": stat.count, "Sum": stat.total,
                 "Minimum": stat.minimum, "Maximum": stat.maximum}
    if not stat.values:
        yield {**base, "StatisticValues": statistic}
        return
    # Values/Counts so percentiles work (CloudWatch derives count, sum, min and max from
    # them too); more than 150 distinct values go into several datums of the same metric
    # and timestamp, which CloudWatch merges.
    items = sorted(stat.values.items())
    for start in range(0, len(items), MAX_VALUES_PER_DATUM):
        part = items[start:start + MAX_VALUES_PER_DATUM]
        yield {**base, "Values": [v for v, _ in part], "Counts": [c for _, c in part]}


def datum_problem(namespace: str, datum: Datum) -> str | None:
    """Why the API would refuse this finished datum, or None: its name, dimensions and unit
    (`key_problem`) and every number within the API's range (`number_problem`)."""
    key = MetricKey(namespace, datum["MetricName"],
                    tuple((d["Name"], d["Value"]) for d in datum.get("Dimensions", ())),
                    datum.get("Unit", "None"))
    problem = key_problem(key)
    if problem is not None:
        return problem
    numbers = list(datum.get("Values", ())) + list(datum.get("Counts", ()))
    numbers += list(datum.get("StatisticValues", {}).values())
    if "Value" in datum:
        numbers.append(datum["Value"])
    for number in numbers:
        problem = number_problem(number)
        if problem is not None:
            return problem
    if any(count < 0 for count in datum.get("Counts", ())) or len(
            datum.get("Values", ())) > MAX_VALUES_PER_DATUM:
        return "counts"
    return None


def _json_size(datum: Datum) -> int:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return int(value.timestamp())
        raise TypeError(type(value).__name__)

    return len(json.dumps(datum, default=default).encode())


def request_size(request: dict[str, Any]) -> int:
    """Bytes of one PutMetricData request's JSON body, as botocore serializes it."""
    return _json_size(request)


def split_metric_data(namespace: str, items: list[Datum],
                      max_bytes: int = MAX_BODY_BYTES) -> list[list[Datum]]:
    """Cut datums into the fewest requests within the datum and byte limits."""
    envelope = len(json.dumps({"Namespace": namespace, "MetricData": []}).encode())
    batches: list[list[Datum]] = []
    current: list[Datum] = []
    size = envelope
    for datum in items:
        cost = _json_size(datum) + 2  # + the ", " between datums
        if current and (len(current) >= MAX_DATUMS or size + cost > max_bytes):
            batches.append(current)
            current, size = [], envelope
        current.append(datum)
        size += cost
    if current:
        batches.append(current)
    return batches
