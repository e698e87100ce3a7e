"""The CloudWatch Logs sink: log events -> PutLogEvents batches for one group and stream.

Events queue in an `Outbox` (memory, then the disk spool, then drop-oldest). A
batch is sent as soon as it is full, or at most `flush_after` seconds after its
oldest event arrived. The group and stream are created on first use (an
existing one is fine) and again when the service says they are gone. Events the
service rejects (too old, too new) come back in `rejectedLogEventsInfo`: they
are counted and not retried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

from agent.errors import DeliveryError
from agent.log import get_logger
from agent.model import LogEvent
from agent.rules.batching import (
    LOG_BATCH_MAX_BYTES,
    LOG_BATCH_MAX_EVENTS,
    LOG_EVENT_OVERHEAD,
    log_batch_params,
    log_event_cost,
    take_log_batch,
)
from agent.rules.lines import MAX_EVENT_BYTES
from agent.sinks.aws import AwsCaller
from agent.sinks.delivery import BATCH_DEADLINE_S, BatchSender
from agent.sinks.outbox import Codec, CorruptSegment, Outbox
from agent.sinks.prometheus import Series

FLUSH_AFTER_S = 5.0
# Two batches in flight keep botocore's serializing of one overlapped with the service's
# handling of the other; more buys nothing on two cores and risks throttling.
PARALLEL_BATCHES = 2
# What a queued event costs in memory beyond its message's bytes: the LogEvent tuple (72 B),
# the str header (49 B), the timestamp int (28 B) and the deque slot (8 B). The memory bound
# counts this, so TELEMETRY_BUFFER_MB is close to real memory even for short lines.
EVENT_MEMORY = 160
_API_MINUS_MEMORY = EVENT_MEMORY - LOG_EVENT_OVERHEAD
# Room kept free for one turn of framing (2 MiB of short lines is about 5 MiB of events).
SATURATION_HEADROOM = 8 << 20


def _memory_cost(event: LogEvent) -> int:
    return event.size + EVENT_MEMORY

_log = get_logger("cloudwatch_logs")


def _encode(events: list[LogEvent]) -> bytes:
    return json.dumps([[e.timestamp_ms, e.stream, e.message] for e in events],
                      ensure_ascii=False, separators=(",", ":")).encode()


def _decode(data: bytes) -> list[LogEvent]:
    """A spooled batch back into events, checked in full; raises `CorruptSegment` only.

    Anything `_encode` could not have written is refused: not JSON, not a non-empty list
    of [timestamp, stream, message], a timestamp that is not an int in 0..year 9999, a
    stream other than stdout/stderr, a message that is not UTF-8 text or is longer than
    an event may be, or a batch beyond PutLogEvents' limits. A bad file is then
    quarantined instead of crashing the sender or being refused by the service.
    """
    try:
        rows = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptSegment(f"not JSON: {exc}") from exc
    if type(rows) is not list or not rows:
        raise CorruptSegment("not a non-empty list of events")
    events: list[LogEvent] = []
    for row in rows:
        if type(row) is not list or len(row) != 3:
            raise CorruptSegment("an event is not [timestamp, stream, message]")
        ts, stream, msg = row
        if type(ts) is not int or not 0 <= ts <= _MAX_TIMESTAMP_MS:
            raise CorruptSegment(f"timestamp out of range: {str(ts)[:40]}")
        if type(stream) is not str or stream not in _STREAMS:
            raise CorruptSegment(f"unknown stream: {str(stream)[:40]}")
        if type(msg) is not str:
            raise CorruptSegment("a message is not text")
        try:
            size = len(msg.encode())
        except UnicodeEncodeError as exc:  # a lone surrogate from a \ud800 escape
            raise CorruptSegment("a message is not valid UTF-8") from exc
        if size > MAX_EVENT_BYTES:
            raise CorruptSegment(f"a message of {size} bytes is longer than an event may be")
        events.append(LogEvent(ts, msg, stream, size))
    if take_log_batch(events) != len(events):
        raise CorruptSegment("the batch is beyond PutLogEvents' limits")
    return events


_STREAMS = ("stdout", "stderr")
_MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


LOG_CODEC: Codec[LogEvent] = Codec(_encode, _decode)


class CloudWatchLogsSink(BatchSender[LogEvent]):
    """Batches log events into PutLogEvents calls.

    Args:
        caller: makes (or records) the AWS calls.
        group: the log group.
        stream: the log stream.
        max_bytes: memory bound on queued events (PutLogEvents bytes).
        spool: the spool directory for this stream, or None.
        spool_max_bytes: the spool's bound.
        retention_days: retention to set on a group the agent creates, or None.
        flush_after: the longest an event waits for its batch to fill.
    """

    def __init__(self, caller: AwsCaller, group: str, stream: str, *, max_bytes: int,
                 spool: Path | None = None, spool_max_bytes: int = 0,
                 retention_days: int | None = None, flush_after: float = FLUSH_AFTER_S,
                 batch_deadline: float = BATCH_DEADLINE_S) -> None:
        super().__init__(Outbox("logs", max_bytes=max_bytes, cost=_memory_cost,
                                cut=take_log_batch, codec=LOG_CODEC, spool=spool,
                                spool_max_bytes=spool_max_bytes),
                         batch_deadline=batch_deadline, parallel=PARALLEL_BATCHES)
        self._caller = caller
        self.group = group
        self.stream = stream
        self._retention = retention_days
        self._flush_after = flush_after
        self._oldest_at = 0.0
        self._created = False
        self._group_denied = False  # logged once
        self.stats = {"events_sent": 0, "batches_sent": 0, "bytes_sent": 0,
                      "events_dropped_rejected": 0, "events_dropped_invalid": 0}

    name = "cloudwatch_logs"
    item = "events"

    def counters(self) -> dict[str, int]:
        return {**super().counters(), **self.stats, "events_possible_duplicates":
                self._caller.stats["possible_duplicates", "PutLogEvents", ""]}

    def series(self) -> list[Series]:
        out = super().series()
        out += [Series("dropped", {"sink": "logs", "reason": reason},
                       self.stats[f"events_dropped_{reason}"]) for reason in ("rejected", "invalid")]
        if self.stats["batches_sent"]:
            fill = self.stats["bytes_sent"] / (self.stats["batches_sent"] * LOG_BATCH_MAX_BYTES)
            out.append(Series("log_batch_fill_ratio", {}, fill, True))
        return out

    # -- intake --------------------------------------------------------------------------------

    def submit(self, events: Sequence[LogEvent]) -> None:
        """Queue events; never blocks (the outbox spills or drops beyond its bound)."""
        if not events:
            return
        fresh = not self.outbox.queued_items
        self.outbox.put(events)
        if fresh:
            self._oldest_at = time.monotonic()
            self.wake()
        elif self._full():
            self.wake()

    def saturated(self) -> bool:
        """Memory is nearly at its bound: producers should wait rather than push the oldest
        out (with a spool, puts spill down to 3/4 of the bound, so this stays false)."""
        headroom = min(SATURATION_HEADROOM, self.outbox.max_bytes // 4)
        return self.outbox.queued_items > 0 and (
            self.outbox.memory_bytes > self.outbox.max_bytes - headroom)

    def _full(self) -> bool:
        """A whole PutLogEvents batch is queued (its bytes counted as the API counts them)."""
        items = self.outbox.queued_items
        api_bytes = self.outbox.queued_bytes - _API_MINUS_MEMORY * items
        return api_bytes >= LOG_BATCH_MAX_BYTES or items >= LOG_BATCH_MAX_EVENTS

    def ready(self) -> bool:
        return self._full() or self.wait_hint() <= 0

    def wait_hint(self) -> float:
        return self._flush_after - (time.monotonic() - self._oldest_at)

    def may_overlap(self, batch: list[LogEvent], running: list[list[LogEvent]]) -> bool:
        """Only batches with later timestamps than every one in flight: CloudWatch orders a
        stream by timestamp, so whichever lands first, the stream's order is the child's."""
        first = min(e.timestamp_ms for e in batch)
        return all(first > max(e.timestamp_ms for e in other) for other in running)

    # -- delivery ------------------------------------------------------------------------------

    async def send(self, batch: list[LogEvent], deadline: float) -> None:
        if self.outbox.queued_items:
            self._oldest_at = time.monotonic()  # what is left starts a new wait
        if not self._created:
            await self._create(deadline)
        params = log_batch_params(self.group, self.stream, batch)
        size = sum(log_event_cost(e) for e in batch)
        call = self._caller.deliver
        try:
            answer = await call("logs", "PutLogEvents", params, deadline=deadline,
                                items=len(batch), size=size)
        except DeliveryError as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            await self._create(deadline)
            answer = await call("logs", "PutLogEvents", params, deadline=deadline,
                                items=len(batch), size=size)
        rejected = _rejected_count(answer.get("rejectedLogEventsInfo"), len(batch))
        if rejected:
            self.stats["events_dropped_rejected"] += rejected
            _log.warning("log_events_rejected", count=rejected, info=answer["rejectedLogEventsInfo"],
                         reason="older than 14 days or the retention, or over 2 hours ahead")
        self.stats["events_sent"] += len(batch) - rejected
        self.stats["batches_sent"] += 1
        self.stats["bytes_sent"] += size

    def dropped(self, batch: list[LogEvent], error: DeliveryError) -> None:
        self.stats["events_dropped_invalid"] += len(batch)
        _log.error("log_batch_dropped", error=str(error), events=len(batch),
                   reason="the service refused the batch; retrying cannot help")

    async def _create(self, deadline: float) -> None:
        """Create the group (and set retention) and the stream; existing ones are fine.

        A least-privilege role may not create groups while SageMaker has made this one:
        an AccessDenied on CreateLogGroup is not retried but logged once, and the agent
        goes on to CreateLogStream and PutLogEvents, as the CloudWatch agent does (it was
        retried forever). Only if the stream then cannot be made for want of its group is
        CreateLogGroup retried, slowly, like any rejected credentials, until `deadline`;
        the batch is kept meanwhile.
        """
        call = self._caller.deliver
        group = {"logGroupName": self.group}
        denied = False
        try:
            await call("logs", "CreateLogGroup", group, deadline=deadline, final=ACCESS_DENIED)
            if self._retention is not None:
                await call("logs", "PutRetentionPolicy",
                           {**group, "retentionInDays": self._retention}, deadline=deadline)
        except DeliveryError as exc:
            if exc.code in ACCESS_DENIED:
                denied = True
                if not self._group_denied:
                    self._group_denied = True
                    _log.warning("log_group_not_created", group=self.group, error=str(exc),
                                 then="going on with the group as it is (made by SageMaker?)")
            elif exc.code != "ResourceAlreadyExistsException":
                raise
        stream = {**group, "logStreamName": self.stream}
        try:
            await call("logs", "CreateLogStream", stream, deadline=deadline)
        except DeliveryError as exc:
            if exc.code == "ResourceNotFoundException" and denied:
                # The group is really missing: wait for it, or for the permission.
                if await _exists_ok(call("logs", "CreateLogGroup", group, deadline=deadline)) \
                        and self._retention is not None:
                    await call("logs", "PutRetentionPolicy",
                               {**group, "retentionInDays": self._retention}, deadline=deadline)
                await _exists_ok(call("logs", "CreateLogStream", stream, deadline=deadline))
            elif exc.code != "ResourceAlreadyExistsException":
                raise
        self._created = True


ACCESS_DENIED = frozenset({"AccessDenied", "AccessDeniedException"})


async def _exists_ok(creation: Awaitable[object]) -> bool:
    """Await a Create* call; True if it created the resource, False if it already existed
    (which is what the call was for)."""
    try:
        await creation
    except DeliveryError as exc:
        if exc.code != "ResourceAlreadyExistsException":
            raise
        return False
    return True


def _rejected_count(info: dict[str, int] | None, total: int) -> int:
    """Events PutLogEvents refused (too old, too new, expired); they must not be retried."""
    if not info:
        return 0
    rejected = set()
    if "tooNewLogEventStartIndex" in info:
        rejected.update(range(info["tooNewLogEventStartIndex"], total))
    if "tooOldLogEventEndIndex" in info:
        rejected.update(range(info["tooOldLogEventEndIndex"]))
    if "expiredLogEventEndIndex" in info:
        rejected.update(range(info["expiredLogEventEndIndex"]))
    return len(rejected)
