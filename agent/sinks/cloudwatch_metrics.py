"""The CloudWatch metrics sink: closed intervals -> the fewest PutMetricData calls.

Publication happens at a random offset inside the interval after it closes
(chosen once per agent), so a fleet of containers does not call at the same
second; the offset is applied by the app's publisher loop.
"""

from __future__ import annotations

from agent.aggregate import ClosedInterval
from agent.errors import DeliveryError
from agent.log import get_logger
from agent.rules.metric_data import datums, finite, split_metric_data
from agent.sinks.aws import AwsCaller

_log = get_logger("cloudwatch_metrics")


class CloudWatchMetricsSink:
    """Sends closed intervals as PutMetricData calls.

    Args:
        caller: makes (or records) the calls.
        high_resolution: publish with StorageResolution=1.
    """

    def __init__(self, caller: AwsCaller, *, high_resolution: bool) -> None:
        self._caller = caller
        self._high_resolution = high_resolution
        self.stats = {"calls": 0, "datums_sent": 0, "datums_dropped_nonfinite": 0,
                      "datums_dropped_failed": 0}

    async def publish(self, intervals: list[ClosedInterval]) -> None:
        """Send every datum of these intervals, namespace by namespace."""
        grouped: dict[str, list[dict[str, object]]] = {}
        for interval in intervals:
            for namespace, items in datums(interval, high_resolution=self._high_resolution).items():
                grouped.setdefault(namespace, []).extend(items)
        for namespace, items in grouped.items():
            good = [d for d in items if finite(d)]
            self.stats["datums_dropped_nonfinite"] += len(items) - len(good)
            for batch in split_metric_data(namespace, good):
                try:
                    await self._caller.call("cloudwatch", "PutMetricData",
                                            {"Namespace": namespace, "MetricData": batch})
                except DeliveryError as exc:
                    self.stats["datums_dropped_failed"] += len(batch)
                    _log.error("metric_batch_dropped", error=str(exc), datums=len(batch))
                    continue
                self.stats["calls"] += 1
                self.stats["datums_sent"] += len(batch)
