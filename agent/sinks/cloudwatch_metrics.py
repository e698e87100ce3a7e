"""The CloudWatch metrics sink: closed intervals -> the fewest PutMetricData calls.

Each closed interval becomes requests cut by `split_metric_data` (≤ 1,000 datums,
≤ 1 MB measured as botocore serializes them). Requests queue in an `Outbox`
(memory, then the disk spool, then drop-oldest) and are sent one at a time by
the shared delivery loop, so an outage delays datapoints instead of losing them
(CloudWatch accepts timestamps up to two weeks old). Publication happens at a
random offset after each interval closes (chosen once per agent, applied by the
app's publisher loop) so a fleet of containers does not call at the same second.

SageMaker's figures (invocation and instance metrics) and custom (StatsD) ones
never share a call: custom requests are `CustomRequest`s, queued after SageMaker's,
and the outbox drops them first whenever it is over its memory bound (they are
never spilled to the spool while over it), so a flood of custom metrics cannot cost
SageMaker's. The figures were checked at the door (aggregation); a datum that still
fails `datum_problem`, or a call the service refuses as invalid, is a bug of the
agent and is logged as one.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import DeliveryError
from agent.log import first_or_every, get_logger
from agent.model import ClosedInterval
from agent.rules.metric_data import (
    datum_problem,
    datums,
    request_size,
    split_metric_data,
)
from agent.sinks.aws import AwsCaller
from agent.sinks.delivery import BATCH_DEADLINE_S, BatchSender
from agent.sinks.outbox import Codec, CorruptSegment, Outbox
from agent.sinks.prometheus import Series

Request = dict[str, Any]  # PutMetricData keyword arguments: Namespace, MetricData
BUG = "this is a bug of the agent, please report it with this line"


class CustomRequest(dict[str, Any]):
    """A PutMetricData request that holds custom (StatsD) metrics only: dropped first."""


def expendable(request: Request) -> bool:
    """Whether the outbox may drop this request before any other (custom metrics)."""
    return type(request) is CustomRequest

_log = get_logger("cloudwatch_metrics")


def _encode(requests: list[Request]) -> bytes:
    """Requests as JSON; datetimes (the datums' Timestamp) as {"$t": epoch seconds}."""
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return {"$t": value.timestamp()}
        raise TypeError(type(value).__name__)

    return json.dumps(requests, default=default, separators=(",", ":")).encode()


def _decode(data: bytes) -> list[Request]:
    """Spooled requests back, checked in full; raises `CorruptSegment` only.

    Each request must be exactly {Namespace, MetricData} and each datum have only the
    keys `datums` writes, of the right types and lengths, with finite numbers within
    CloudWatch's range and a Timestamp within what a datetime holds. Anything else would
    crash the sender (a 1e20 timestamp overflows) or make botocore or the service refuse
    the call, so the file is quarantined instead.
    """
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptSegment(f"not JSON: {exc}") from exc
    if type(raw) is not list or not raw:
        raise CorruptSegment("not a non-empty list of requests")
    return [_request(r) for r in raw]


_MAX_MAGNITUDE = 2.0 ** 360  # CloudWatch's range for values
_MAX_EPOCH_S = 253_402_300_798  # 9999-12-31T23:59:58Z: rounding up stays within datetime
_OPTIONAL_KEYS = {"Dimensions", "StorageResolution"}
_VALUE_KEYS = ({"StatisticValues"}, {"Values", "Counts"}, {"Value"})
_STATISTICS = {"SampleCount", "Sum", "Minimum", "Maximum"}


def _request(raw: Any) -> Request:
    if type(raw) is not dict or raw.keys() != {"Namespace", "MetricData"}:
        raise CorruptSegment("a request is not {Namespace, MetricData}")
    data = raw["MetricData"]
    if type(data) is not list or not 1 <= len(data) <= 1000:
        raise CorruptSegment("MetricData is not a list of 1 to 1,000 datums")
    return {"Namespace": _text(raw["Namespace"], 255), "MetricData": [_datum(d) for d in data]}


def _datum(raw: Any) -> dict[str, Any]:
    if type(raw) is not dict:
        raise CorruptSegment("a datum is not an object")
    values = raw.keys() - {"MetricName", "Timestamp", "Unit"} - _OPTIONAL_KEYS
    if not {"MetricName", "Timestamp", "Unit"} <= raw.keys() or values not in _VALUE_KEYS:
        raise CorruptSegment(f"a datum has the keys {sorted(raw)[:10]}")
    out: dict[str, Any] = {"MetricName": _text(raw["MetricName"], 255),
                           "Timestamp": _timestamp(raw["Timestamp"]),
                           "Unit": _text(raw["Unit"], 32)}
    if "Dimensions" in raw:
        dims = raw["Dimensions"]
        if type(dims) is not list or len(dims) > 30:
            raise CorruptSegment("Dimensions is not a list of at most 30")
        out["Dimensions"] = [_dimension(d) for d in dims]
    if "StorageResolution" in raw:
        if type(raw["StorageResolution"]) is not int or raw["StorageResolution"] not in (1, 60):
            raise CorruptSegment("StorageResolution is not 1 or 60")
        out["StorageResolution"] = raw["StorageResolution"]
    if "Value" in raw:
        out["Value"] = _number(raw["Value"])
    elif "Values" in raw:
        vals, counts = raw["Values"], raw["Counts"]
        if (type(vals) is not list or type(counts) is not list
                or not 1 <= len(vals) <= 150 or len(vals) != len(counts)):
            raise CorruptSegment("Values and Counts are not lists of 1 to 150, alike")
        out["Values"] = [_number(v) for v in vals]
        out["Counts"] = [_number(c) for c in counts]
    else:
        stats = raw["StatisticValues"]
        if type(stats) is not dict or stats.keys() != _STATISTICS:
            raise CorruptSegment("StatisticValues is not {SampleCount, Sum, Minimum, Maximum}")
        out["StatisticValues"] = {k: _number(v) for k, v in stats.items()}
    return out


def _dimension(raw: Any) -> dict[str, str]:
    if type(raw) is not dict or raw.keys() != {"Name", "Value"}:
        raise CorruptSegment("a dimension is not {Name, Value}")
    return {"Name": _text(raw["Name"], 255), "Value": _text(raw["Value"], 1024)}


def _text(value: Any, limit: int) -> str:
    if type(value) is not str or not 1 <= len(value) <= limit:
        raise CorruptSegment(f"not a text of 1 to {limit} characters: {str(value)[:40]}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate from a \ud800 escape
        raise CorruptSegment("text is not valid UTF-8") from exc
    return value


def _number(value: Any) -> float:
    if type(value) not in (int, float) or abs(value) > _MAX_MAGNITUDE or not math.isfinite(value):
        raise CorruptSegment(f"not a finite number within ±2^360: {str(value)[:40]}")
    return value  # type: ignore[no-any-return]


def _timestamp(raw: Any) -> datetime:
    if type(raw) is not dict or raw.keys() != {"$t"}:
        raise CorruptSegment("Timestamp is not {$t: seconds}")
    seconds = raw["$t"]
    if type(seconds) not in (int, float) or not 0 <= seconds <= _MAX_EPOCH_S:
        raise CorruptSegment(f"Timestamp out of range: {str(seconds)[:40]}")
    return datetime.fromtimestamp(seconds, UTC)


METRIC_CODEC: Codec[Request] = Codec(_encode, _decode)


class CloudWatchMetricsSink(BatchSender[Request]):
    """Sends closed intervals as PutMetricData calls.

    Args:
        caller: makes (or records) the calls.
        high_resolution: publish with StorageResolution=1.
        max_bytes: memory bound on queued requests.
        spool: the spool directory for metrics, or None.
        spool_max_bytes: the spool's bound.
    """

    def __init__(self, caller: AwsCaller, *, high_resolution: bool, max_bytes: int = 4 << 20,
                 spool: Path | None = None, spool_max_bytes: int = 0,
                 batch_deadline: float = BATCH_DEADLINE_S) -> None:
        super().__init__(Outbox("metrics", max_bytes=max_bytes, cost=request_size,
                                cut=lambda _: 1, codec=METRIC_CODEC, spool=spool,
                                spool_max_bytes=spool_max_bytes, expendable=expendable),
                         batch_deadline=batch_deadline)
        self._caller = caller
        self._high_resolution = high_resolution
        self.outbox.stats.dropped.setdefault("expendable", 0)  # custom requests, dropped first
        self.stats = {"calls": 0, "datums_sent": 0, "custom_datums_sent": 0,
                      "datums_dropped_unsendable": 0, "datums_dropped_invalid": 0}

    name = "cloudwatch_metrics"
    item = "requests"

    def counters(self) -> dict[str, int]:
        return {**super().counters(), **self.stats}

    def series(self) -> list[Series]:
        return [*super().series(), *(
            Series("dropped", {"sink": "metrics", "reason": reason},
                   self.stats[f"datums_dropped_{reason}"]) for reason in ("invalid", "unsendable"))]

    def submit(self, intervals: list[ClosedInterval]) -> int:
        """Queue every datum of these intervals as requests, SageMaker's first, custom ones
        in requests of their own; return how many requests."""
        requests: list[Request] = []
        for custom in (False, True):
            grouped: dict[str, list[dict[str, Any]]] = {}
            for interval in intervals:
                for namespace, items in datums(interval, high_resolution=self._high_resolution,
                                               custom=custom).items():
                    grouped.setdefault(namespace, []).extend(items)
            make = CustomRequest if custom else dict
            for namespace, items in grouped.items():
                good = [d for d in items if self._sendable(namespace, d)]
                requests += [make(Namespace=namespace, MetricData=batch)
                             for batch in split_metric_data(namespace, good)]
        if requests:
            self.outbox.put(requests)
            self.wake()
        return len(requests)

    def _sendable(self, namespace: str, datum: dict[str, Any]) -> bool:
        """The last guard: a datum the API would refuse is dropped, counted and reported
        (the door in aggregation should have refused its figures already)."""
        problem = datum_problem(namespace, datum)
        if problem is None:
            return True
        self.stats["datums_dropped_unsendable"] += 1
        count = self.stats["datums_dropped_unsendable"]
        if first_or_every(count, 1000):
            _log.error("metric_datum_unsendable", reason=problem, dropped=count,
                       namespace=namespace, metric=ascii(datum.get("MetricName", ""))[:120],
                       bug=BUG)
        return False

    async def send(self, batch: list[Request], deadline: float) -> None:
        for request in batch:  # one request per batch (cut = 1)
            count = len(request["MetricData"])
            await self._caller.deliver("cloudwatch", "PutMetricData", dict(request),
                                       deadline=deadline, items=count, size=request_size(request))
            self.stats["calls"] += 1
            self.stats["datums_sent"] += count
            if expendable(request):
                self.stats["custom_datums_sent"] += count

    def dropped(self, batch: list[Request], error: DeliveryError) -> None:
        """The service (or botocore's own check) refused a request as invalid. Every datum
        was checked against CloudWatch's rules before it was queued, so this is a bug: say so
        at error level, with what a report needs."""
        count = sum(len(r["MetricData"]) for r in batch)
        self.stats["datums_dropped_invalid"] += count
        first = batch[0]["MetricData"][0] if batch and batch[0]["MetricData"] else {}
        _log.error("metric_request_refused", code=error.code, error=str(error)[:300],
                   datums=count, custom=any(expendable(r) for r in batch),
                   namespace=batch[0]["Namespace"] if batch else None,
                   first_datum=ascii({k: v for k, v in first.items() if k != "Timestamp"})[:600],
                   bug=BUG, then="dropped: retrying cannot help")
