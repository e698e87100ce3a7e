"""The CloudWatch metrics sink: closed intervals -> the fewest PutMetricData calls.

Each closed interval becomes requests cut by `split_metric_data` (≤ 1,000 datums,
≤ 1 MB measured as botocore serializes them). Requests queue in an `Outbox`
(memory, then the disk spool, then drop-oldest) and are sent one at a time by
the shared delivery loop, so an outage delays datapoints instead of losing them
(CloudWatch accepts timestamps up to two weeks old). Publication happens at a
random offset after each interval closes (chosen once per agent, applied by the
app's publisher loop) so a fleet of containers does not call at the same second.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.aggregate import ClosedInterval
from agent.errors import DeliveryError
from agent.log import get_logger
from agent.rules.metric_data import datums, finite, request_size, split_metric_data
from agent.sinks.aws import AwsCaller
from agent.sinks.delivery import BATCH_DEADLINE_S, BatchSender
from agent.sinks.outbox import Codec, Outbox

Request = dict[str, Any]  # PutMetricData keyword arguments: Namespace, MetricData

_log = get_logger("cloudwatch_metrics")


def _encode(requests: list[Request]) -> bytes:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return {"$t": value.timestamp()}
        raise TypeError(type(value).__name__)

    return json.dumps(requests, default=default, separators=(",", ":")).encode()


def _decode(data: bytes) -> list[Request]:
    def hook(obj: dict[str, Any]) -> Any:
        if obj.keys() == {"$t"}:
            return datetime.fromtimestamp(obj["$t"], UTC)
        return obj

    requests: list[Request] = json.loads(data, object_hook=hook)
    return requests


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
                                spool_max_bytes=spool_max_bytes),
                         batch_deadline=batch_deadline)
        self._caller = caller
        self._high_resolution = high_resolution
        self.stats = {"calls": 0, "datums_sent": 0, "datums_dropped_nonfinite": 0,
                      "datums_dropped_invalid": 0}

    def submit(self, intervals: list[ClosedInterval]) -> int:
        """Queue every datum of these intervals as requests; return how many requests."""
        grouped: dict[str, list[dict[str, object]]] = {}
        for interval in intervals:
            for namespace, items in datums(interval, high_resolution=self._high_resolution).items():
                grouped.setdefault(namespace, []).extend(items)
        requests: list[Request] = []
        for namespace, items in grouped.items():
            good = [d for d in items if finite(d)]
            self.stats["datums_dropped_nonfinite"] += len(items) - len(good)
            requests += [{"Namespace": namespace, "MetricData": batch}
                         for batch in split_metric_data(namespace, good)]
        if requests:
            self.outbox.put(requests)
            self.wake()
        return len(requests)

    async def send(self, batch: list[Request], deadline: float) -> None:
        for request in batch:  # one request per batch (cut = 1)
            count = len(request["MetricData"])
            await self._caller.deliver("cloudwatch", "PutMetricData", request, deadline=deadline,
                                       items=count, size=request_size(request))
            self.stats["calls"] += 1
            self.stats["datums_sent"] += count

    def dropped(self, batch: list[Request], error: DeliveryError) -> None:
        count = sum(len(r["MetricData"]) for r in batch)
        self.stats["datums_dropped_invalid"] += count
        _log.error("metric_batch_dropped", error=str(error), datums=count,
                   reason="the service refused the request; retrying cannot help")
