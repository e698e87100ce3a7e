"""The delivery loop both CloudWatch sinks share: outbox -> one batch at a time -> AWS.

A sink's intake (`Outbox.put`) never waits for this loop: retries of one batch
happen here, while new data keeps queueing (and spilling) behind it. A batch
that cannot be delivered before its deadline goes back to the head of the
outbox, so a stream's order is kept and nothing is dropped for being late; a
batch the service refuses for good is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from agent.errors import DeliveryError
from agent.log import get_logger
from agent.sinks.outbox import Outbox

T = TypeVar("T")

# How long one batch is retried before the loop logs that delivery is stalled and starts
# over with it (the batch stays first in line; it is never dropped for being late).
BATCH_DEADLINE_S = 120.0

_log = get_logger("delivery")


class BatchSender(ABC, Generic[T]):
    """Runs an outbox's deliveries until closed.

    Args:
        outbox: where the sink's intake queues items.
        batch_deadline: seconds one batch is retried before starting over.
    """

    def __init__(self, outbox: Outbox[T], *, batch_deadline: float = BATCH_DEADLINE_S) -> None:
        self.outbox = outbox
        self._batch_deadline = batch_deadline
        self._wake = asyncio.Event()
        self._closing: float | None = None
        self.stalls = 0

    # -- what a sink defines ---------------------------------------------------------------------

    @abstractmethod
    async def send(self, batch: list[T], deadline: float) -> None:
        """Deliver one batch (raise `DeliveryError` when it could not be)."""

    @abstractmethod
    def dropped(self, batch: list[T], error: DeliveryError) -> None:
        """Count and log a batch the service refused for good."""

    def ready(self) -> bool:
        """Whether the queued items should be sent now (the logs sink waits for a full batch)."""
        return True

    def wait_hint(self) -> float | None:
        """Seconds until `ready` turns true by itself, or None to wait for a wake-up."""
        return None

    # -- the loop -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed (items queued): look again."""
        self._wake.set()

    def close(self, deadline: float) -> None:
        """Send everything, ready or not, until the outbox is empty or `deadline` (monotonic)."""
        self._closing = deadline
        self._wake.set()

    async def run(self) -> None:
        """Deliver batches until cancelled, or until closed and empty."""
        while True:
            closing = self._closing is not None
            if not self.outbox or not (closing or self.outbox.backlog or self.ready()):
                if closing:
                    return
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.wait_hint() if self.outbox else None):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            deadline = (self._closing if self._closing is not None
                        else time.monotonic() + self._batch_deadline)
            if not await self._deliver_one(deadline) and self._closing is not None:
                return  # the shutdown budget is spent; the caller persists or counts the rest

    async def _deliver_one(self, deadline: float) -> bool:
        batch = self.outbox.take()
        if batch is None:
            return True
        try:
            await self.send(batch, deadline)
        except DeliveryError as exc:
            if exc.retryable:
                self.outbox.give_back()
                if self._closing is None:
                    self.stalls += 1
                    _log.warning("delivery_stalled", outbox=self.outbox.name, error=str(exc),
                                 pending=self.outbox.pending_items,
                                 memory_bytes=self.outbox.memory_bytes,
                                 spool_bytes=self.outbox.spool_bytes, then="still retrying")
                return False
            self.outbox.done()
            self.dropped(batch, exc)
        except BaseException:
            self.outbox.give_back()  # cancelled mid-call: the batch stays first in line
            raise
        else:
            self.outbox.done()
        return True
