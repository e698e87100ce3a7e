"""Packing data into AWS calls within the API limits.

Every limit is a named constant with its source; the functions are pure and
work on sequences so they can be property-tested.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.model import LogEvent

# PutLogEvents (CloudWatch Logs API reference): the batch size is the sum of the UTF-8
# message bytes plus 26 bytes per event, at most 1,048,576; at most 10,000 events;
# the events of one batch may span at most 24 hours.
LOG_BATCH_MAX_BYTES = 1_048_576
LOG_EVENT_OVERHEAD = 26
LOG_BATCH_MAX_EVENTS = 10_000
LOG_BATCH_MAX_SPAN_MS = 24 * 3600 * 1000


def log_event_cost(event: LogEvent) -> int:
    """Bytes an event counts for in a PutLogEvents batch."""
    return event.size + LOG_EVENT_OVERHEAD


def take_log_batch(pending: Sequence[LogEvent]) -> int:
    """How many of the first `pending` events make the next PutLogEvents batch.

    Takes events in order while the batch stays within the byte, count and
    24-hour span limits. Always takes at least one event when any is pending
    (every event fits a batch on its own, see `MAX_EVENT_BYTES`).
    """
    total = 0
    low = high = None
    for count, event in enumerate(pending):
        if count >= LOG_BATCH_MAX_EVENTS:
            return count
        total += log_event_cost(event)
        ts = event.timestamp_ms
        low = ts if low is None else min(low, ts)
        high = ts if high is None else max(high, ts)
        if count and (total > LOG_BATCH_MAX_BYTES or high - low > LOG_BATCH_MAX_SPAN_MS):
            return count
    return len(pending)


def log_batch_params(group: str, stream: str, events: Sequence[LogEvent]) -> dict[str, object]:
    """PutLogEvents keyword arguments, events sorted by time (stable, so order ties hold)."""
    ordered = sorted(events, key=lambda e: e.timestamp_ms)
    return {
        "logGroupName": group,
        "logStreamName": stream,
        "logEvents": [{"timestamp": e.timestamp_ms, "message": e.message} for e in ordered],
    }
