"""The CloudWatch Logs sink: log events -> PutLogEvents batches for one group and stream.

Events wait in a bounded buffer (oldest dropped and counted beyond the bound).
A batch is sent as soon as it is full, or at most `flush_after` seconds after
its oldest event arrived. The group and stream are created on first use (an
existing one is fine) and again when the service says they are gone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from agent.errors import DeliveryError
from agent.log import get_logger
from agent.model import LogEvent
from agent.rules.batching import (
    LOG_BATCH_MAX_BYTES,
    LOG_BATCH_MAX_EVENTS,
    log_batch_params,
    log_event_cost,
    take_log_batch,
)
from agent.sinks.aws import AwsCaller

FLUSH_AFTER_S = 5.0

_log = get_logger("cloudwatch_logs")


class CloudWatchLogsSink:
    """Batches log events into PutLogEvents calls.

    Args:
        caller: makes (or records) the AWS calls.
        group: the log group.
        stream: the log stream.
        max_bytes: bound on buffered event bytes.
        retention_days: retention to set on a group the agent creates, or None.
        flush_after: the longest an event waits for its batch to fill.
    """

    def __init__(self, caller: AwsCaller, group: str, stream: str, *, max_bytes: int,
                 retention_days: int | None = None, flush_after: float = FLUSH_AFTER_S) -> None:
        self._caller = caller
        self.group = group
        self.stream = stream
        self._max_bytes = max_bytes
        self._retention = retention_days
        self._flush_after = flush_after
        self._pending: deque[LogEvent] = deque()
        self._pending_bytes = 0
        self._oldest_at = 0.0
        self._wake = asyncio.Event()
        self._created = False
        self.stats = {"events_sent": 0, "batches_sent": 0, "bytes_sent": 0,
                      "events_dropped_buffer": 0, "events_dropped_rejected": 0,
                      "events_dropped_invalid": 0}

    # -- intake --------------------------------------------------------------------------------

    def submit(self, events: Sequence[LogEvent]) -> None:
        """Buffer events; never blocks. Beyond the bound the oldest are dropped and counted."""
        if not self._pending:
            self._oldest_at = time.monotonic()
        for event in events:
            self._pending.append(event)
            self._pending_bytes += log_event_cost(event)
        while self._pending_bytes > self._max_bytes and self._pending:
            dropped = self._pending.popleft()
            self._pending_bytes -= log_event_cost(dropped)
            self.stats["events_dropped_buffer"] += 1
        if self._batch_full() or len(self._pending) == len(events):
            self._wake.set()

    @property
    def pending_events(self) -> int:
        return len(self._pending)

    def _batch_full(self) -> bool:
        return (self._pending_bytes >= LOG_BATCH_MAX_BYTES
                or len(self._pending) >= LOG_BATCH_MAX_EVENTS)

    # -- delivery loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Send batches when full or old enough, until cancelled."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._flush_after - (time.monotonic() - self._oldest_at)
            if not self._batch_full() and wait > 0:
                self._wake.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            await self._send_one()

    async def flush(self) -> None:
        """Send everything buffered now (shutdown)."""
        while self._pending:
            await self._send_one()

    async def _send_one(self) -> None:
        count = take_log_batch(self._pending)
        batch = [self._pending.popleft() for _ in range(count)]
        self._pending_bytes -= sum(log_event_cost(e) for e in batch)
        if self._pending:
            self._oldest_at = time.monotonic()
        try:
            await self._put(batch)
        except DeliveryError as exc:
            self.stats["events_dropped_invalid"] += len(batch)
            _log.error("log_batch_dropped", error=str(exc), events=len(batch))

    async def _put(self, batch: list[LogEvent]) -> None:
        if not self._created:
            await self._create()
        params = log_batch_params(self.group, self.stream, batch)
        try:
            answer = await self._caller.call("logs", "PutLogEvents", params)
        except DeliveryError as exc:
            if exc.code != "ResourceNotFoundException":
                raise
            await self._create()
            answer = await self._caller.call("logs", "PutLogEvents", params)
        rejected = _rejected_count(answer.get("rejectedLogEventsInfo"), len(batch))
        if rejected:
            self.stats["events_dropped_rejected"] += rejected
            _log.warning("log_events_rejected", count=rejected, info=answer["rejectedLogEventsInfo"])
        self.stats["events_sent"] += len(batch) - rejected
        self.stats["batches_sent"] += 1
        self.stats["bytes_sent"] += sum(log_event_cost(e) for e in batch)

    async def _create(self) -> None:
        """Create the group (and set retention) and the stream; existing ones are fine."""
        try:
            await self._caller.call("logs", "CreateLogGroup", {"logGroupName": self.group})
            if self._retention is not None:
                await self._caller.call("logs", "PutRetentionPolicy",
                                        {"logGroupName": self.group,
                                         "retentionInDays": self._retention})
        except DeliveryError as exc:
            if exc.code != "ResourceAlreadyExistsException":
                raise
        try:
            await self._caller.call("logs", "CreateLogStream",
                                    {"logGroupName": self.group, "logStreamName": self.stream})
        except DeliveryError as exc:
            if exc.code != "ResourceAlreadyExistsException":
                raise
        self._created = True


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
