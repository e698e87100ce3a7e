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
from agent.sinks.outbox import Batch, Outbox

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
        parallel: batches in flight at once. More than one only while `may_overlap`
            says the order cannot suffer (the logs sink: disjoint timestamps).
    """

    def __init__(self, outbox: Outbox[T], *, batch_deadline: float = BATCH_DEADLINE_S,
                 parallel: int = 1) -> None:
        self.outbox = outbox
        self._batch_deadline = batch_deadline
        self._parallel = parallel
        self._wake = asyncio.Event()
        self._closing: float | None = None
        self._gave_up = False
        self._running: dict[asyncio.Task[None], Batch[T]] = {}
        self.stalls = 0
        self.overlapped = 0

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

    def may_overlap(self, batch: list[T], running: list[list[T]]) -> bool:
        """Whether `batch` may be sent while `running` ones are still in flight."""
        return False

    # -- the loop -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed (items queued): look again."""
        self._wake.set()

    def close(self, deadline: float) -> None:
        """Send everything, ready or not, until the outbox is empty or `deadline` (monotonic)."""
        self._closing = deadline
        self._wake.set()

    async def run(self) -> None:
        """Deliver batches until cancelled, or until closed and empty (or out of time)."""
        try:
            while True:
                self._start_sends()
                if self._closing is not None and not self._running and (
                        self._gave_up or not self.outbox.waiting):
                    return
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                timeout = self.wait_hint() if self.outbox.waiting and not self._running else None
                await asyncio.wait({waiter, *self._running}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            tasks = list(self._running)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start_sends(self) -> None:
        while len(self._running) < self._parallel and self.outbox.waiting and not self._gave_up:
            if not (self._closing is not None or self.outbox.backlog or self.ready()):
                return
            batch = self.outbox.take()
            if batch is None:
                return
            if self._running:
                if not self.may_overlap(batch.items, [b.items for b in self._running.values()]):
                    self.outbox.give_back(batch)
                    return
                self.overlapped += 1
            deadline = (self._closing if self._closing is not None
                        else time.monotonic() + self._batch_deadline)
            task = asyncio.create_task(self._deliver(batch, deadline))
            self._running[task] = batch
            task.add_done_callback(self._running.pop)

    async def _deliver(self, batch: Batch[T], deadline: float) -> None:
        try:
            await self.send(batch.items, deadline)
        except DeliveryError as exc:
            if not exc.retryable:
                self.outbox.done(batch)
                self.dropped(batch.items, exc)
                return
            self.outbox.give_back(batch)
            if self._closing is not None:
                self._gave_up = True  # the shutdown budget is spent; the rest is persisted
                return
            self.stalls += 1
            _log.warning("delivery_stalled", outbox=self.outbox.name, error=str(exc),
                         pending=self.outbox.pending_items, memory_bytes=self.outbox.memory_bytes,
                         spool_bytes=self.outbox.spool_bytes, then="still retrying")
        except BaseException:
            self.outbox.give_back(batch)  # cancelled mid-call: the batch stays first in line
            raise
        else:
            self.outbox.done(batch)
