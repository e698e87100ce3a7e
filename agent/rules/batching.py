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
# The largest share of a full batch given up to end it on a millisecond boundary.
TIE_BACKOFF = 0.05


def log_event_cost(event: LogEvent) -> int:
    """Bytes an event counts for in a PutLogEvents batch."""
    return event.size + LOG_EVENT_OVERHEAD


def take_log_batch(pending: Sequence[LogEvent]) -> int:
    """How many of the first `pending` events make the next PutLogEvents batch.

    Takes events in order while the batch stays within the byte, count and
    24-hour span limits. Always takes at least one event when any is pending
    (every event fits a batch on its own, see `MAX_EVENT_BYTES`). When the limit
    falls inside one millisecond, the cut moves back to that millisecond's start
    if that costs at most `TIE_BACKOFF` of the batch, so consecutive batches have
    disjoint timestamps and may be in flight together without reordering.
    """
    total = 0
    low = high = None
    count = len(pending)
    for index, event in enumerate(pending):
        if index >= LOG_BATCH_MAX_EVENTS:
            count = index
            break
        total += log_event_cost(event)
        ts = event.timestamp_ms
        low = ts if low is None else min(low, ts)
        high = ts if high is None else max(high, ts)
        if index and (total > LOG_BATCH_MAX_BYTES or high - low > LOG_BATCH_MAX_SPAN_MS):
            count = index
            break
    if count == len(pending):
        return count
    tie = pending[count].timestamp_ms
    start = count
    floor = max(1, count - int(count * TIE_BACKOFF))
    while start > floor and pending[start - 1].timestamp_ms == tie:
        start -= 1
    return start if pending[start - 1].timestamp_ms != tie else count


def log_batch_params(group: str, stream: str, events: Sequence[LogEvent]) -> dict[str, object]:
    """PutLogEvents keyword arguments, events sorted by time (stable, so order ties hold)."""
    ordered = sorted(events, key=lambda e: e.timestamp_ms)
    return {
        "logGroupName": group,
        "logStreamName": stream,
        "logEvents": [{"timestamp": e.timestamp_ms, "message": e.message} for e in ordered],
    }
