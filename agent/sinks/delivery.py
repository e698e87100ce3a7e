"""The delivery loop both CloudWatch sinks share: outbox -> one batch at a time -> AWS.

A sink's intake (`Outbox.put`) never waits for this loop: retries of one batch
happen here, while new data keeps queueing (and spilling) behind it. A batch
that cannot be delivered before its deadline goes back to the head of the
outbox, so a stream's order is kept and nothing is dropped for being late; a
batch the service refuses for good is dropped, counted and logged. Any other
exception (a bug, a fault nobody foresaw) puts the batch back and ends the loop,
which runs under `agent.tasks.supervise`: logged with its traceback, counted and
restarted after the retry policy's backoff, never retried in a hot loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from agent.errors import DeliveryError
from agent.log import get_logger
from agent.rules.retry import DEFAULT_POLICY, RetryPolicy
from agent.sinks.outbox import Batch, Outbox
from agent.sinks.prometheus import Series
from agent.tasks import supervise

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
        policy: the backoff before the loop starts again after an unexpected exception.
    """

    name = "delivery"
    item = "items"  # what the outbox holds, in counter names: "events", "requests"

    def __init__(self, outbox: Outbox[T], *, batch_deadline: float = BATCH_DEADLINE_S,
                 parallel: int = 1, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.outbox = outbox
        self._policy = policy
        self._fault: BaseException | None = None  # a send's unexpected exception, for `run`
        self._batch_deadline = batch_deadline
        self._parallel = parallel
        self._wake = asyncio.Event()
        self._closing: float | None = None
        self._gave_up = False
        self._running: dict[asyncio.Task[None], Batch[T]] = {}
        self.stalls = 0
        self.overlapped = 0
        self.kept_in_spool = 0
        self._task: asyncio.Task[None] | None = None

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

    def counters(self) -> dict[str, int]:
        """The delivery loop's and the outbox's counters (a sink adds its own)."""
        out = {"delivery_stalls": self.stalls, "batches_overlapped": self.overlapped,
               f"{self.item}_unsent": self.outbox.pending_items,
               f"{self.item}_kept_in_spool": self.kept_in_spool}
        for field in dataclasses.fields(self.outbox.stats):
            value = getattr(self.outbox.stats, field.name)
            if isinstance(value, dict):
                out.update({f"{self.item}_{field.name}_{k}": v for k, v in value.items()})
            else:
                out[f"{self.item}_{field.name.removesuffix('_items')}"] = value
        return out

    def series(self) -> list[Series]:
        """Labelled figures for Prometheus: the outbox's fill and drops, by sink."""
        sink, outbox = self.outbox.name, self.outbox
        out = [Series("buffer_bytes", {"sink": sink}, outbox.memory_bytes, True),
               Series("spool_bytes", {"sink": sink}, outbox.spool_bytes, True),
               Series("pending_items", {"sink": sink}, outbox.pending_items, True)]
        out += [Series("dropped", {"sink": sink, "reason": reason}, count)
                for reason, count in outbox.stats.dropped.items()]
        return out

    # -- the Sink protocol ----------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering (the loop runs as a task until `stop`)."""
        self._task = supervise(f"sink_{self.name}", self.run, self._policy)

    async def stop(self, deadline: float) -> None:
        """Send what is queued until `deadline` (monotonic); what is left goes to the spool
        (`kept_in_spool`) or stays counted as unsent."""
        self.close(deadline)
        if self._task is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self.kept_in_spool = self.outbox.persist()

    # -- the loop -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed (items queued): look again."""
        self._wake.set()

    def close(self, deadline: float) -> None:
        """Send everything, ready or not, until the outbox is empty or `deadline` (monotonic)."""
        self._closing = deadline
        self._wake.set()

    async def run(self) -> None:
        """Deliver batches until cancelled, or until closed and empty (or out of time).

        Raises the first unexpected exception of a send (its batch is back in the outbox),
        for the supervisor to log, count and restart after a backoff.
        """
        self.outbox.start_io()  # spool reads and writes leave the loop from here on
        try:
            while True:
                if self._fault is not None:
                    fault, self._fault = self._fault, None
                    raise fault
                await self.outbox.prefetch(self._parallel)  # reads segments off the loop
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
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A send ended: free its slot; keep an unexpected exception for `run` to raise."""
        self._running.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if self._fault is None:
                self._fault = exc
            self._wake.set()

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
