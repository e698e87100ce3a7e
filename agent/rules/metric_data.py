"""Closed intervals -> PutMetricData requests within the API limits.

PutMetricData (CloudWatch API reference): at most 1,000 datums and 1 MB of request
body per call, at most 150 distinct Values per datum, 30 dimensions, no NaN or
infinity, one namespace per call. The body size is measured, not estimated: each
datum is serialized exactly as botocore's JSON protocol does (`json.dumps` with its
default separators, timestamps as integer epoch seconds; a test compares with
botocore's own serializer), and a request is cut before it would pass the budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from agent.aggregate import ClosedInterval, MetricKey, Statistic

MAX_DATUMS = 1000
# 1 MB is the documented limit (measured on the uncompressed body by the CloudWatch
# agent too); keep a margin for the JSON envelope and headers.
MAX_BODY_BYTES = 1_000_000
MAX_VALUES_PER_DATUM = 150
MAX_DIMENSIONS = 30

Datum = dict[str, Any]


def datums(interval: ClosedInterval, *, high_resolution: bool) -> dict[str, list[Datum]]:
    """PutMetricData datums for one interval, grouped by namespace."""
    stamp = datetime.fromtimestamp(interval.start, UTC)
    out: dict[str, list[Datum]] = {}
    for key, stat in sorted(interval.stats.items(), key=lambda kv: kv[0]):
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


def finite(datum: Datum) -> bool:
    """No NaN or infinity anywhere in the datum (the API rejects them)."""
    numbers = list(datum.get("Values", []))
    numbers += list(datum.get("StatisticValues", {}).values())
    if "Value" in datum:
        numbers.append(datum["Value"])
    return all(math.isfinite(n) for n in numbers)


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
