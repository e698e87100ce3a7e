"""Bounded buffering between a sink's intake and its deliveries: memory, then disk, then drop.

While CloudWatch answers, an outbox holds less than one batch. While it does
not, data piles up: first in memory up to `max_bytes`, then (with a spool
directory) in segment files on disk up to `spool_max_bytes`, and only then are
the oldest items dropped and counted. Order is kept: the batch that came back
undelivered first, then the segments oldest first, then memory.

Segments are whole batches, one file each, named `<seq>-<items>.seg`, and are
deleted only once their batch is delivered. A new agent picks up the segments a
previous one left in the same directory and sends them first, so a restart
during an outage loses nothing either.

Batches leave with `take` and end with `done` (delivered, or refused for good)
or `give_back` (not delivered: back to the head, in their original order).
Several may be in flight; the sender decides when that keeps a stream's order.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from agent.log import get_logger

T = TypeVar("T")

# When memory overflows into the spool, spill down to this fraction of the bound, so that
# segments are whole batches and an outage does not write one file per submit.
SPILL_TO = 0.75
_FIRST_SEQ = 10**12  # leaves room below for batches written back ahead of the queue
_log = get_logger("outbox")


@dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """How a batch becomes a segment file's bytes and back."""

    encode: Callable[[list[T]], bytes]
    decode: Callable[[bytes], list[T]]


@dataclass(slots=True)
class Batch(Generic[T]):
    """A batch taken from an outbox: its items, in order."""

    items: list[T]
    cost: int
    segment: Path | None = None  # the file that still holds it, deleted on delivery
    seq: int = 0                 # take order, so batches given back keep their order


@dataclass(slots=True)
class OutboxStats:
    """Counters for self-telemetry and the last log line."""

    dropped: dict[str, int] = field(default_factory=lambda: {
        "overflow": 0, "spool_full": 0, "spool_corrupt": 0})
    spilled_items: int = 0
    spool_errors: int = 0
    restored_items: int = 0


class Outbox(Generic[T]):
    """A FIFO of items with a memory bound, an optional disk spool, and drop-oldest.

    Args:
        name: for log lines and the spool's file names.
        max_bytes: memory bound (the sum of `cost` of every held item).
        cost: bytes one item counts for.
        cut: how many of the first items of a sequence make the next batch (>= 1).
        codec: how batches are written to the spool.
        spool: the spool directory, or None for memory only.
        spool_max_bytes: the spool's bound.
    """

    def __init__(self, name: str, *, max_bytes: int, cost: Callable[[T], int],
                 cut: Callable[[Sequence[T]], int], codec: Codec[T],
                 spool: Path | None = None, spool_max_bytes: int = 0) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self._cost = cost
        self._cut = cut
        self._codec = codec
        self._spool = spool
        self._spool_max = spool_max_bytes
        self._memory: deque[T] = deque()
        self._memory_bytes = 0
        self._front: list[Batch[T]] = []  # given back, oldest first
        self._inflight: dict[int, Batch[T]] = {}
        self._taken = 0
        self._segments: deque[tuple[Path, int, int]] = deque()  # path, bytes, items
        self._spool_bytes = 0
        self._next_seq = _FIRST_SEQ
        self._low_seq = _FIRST_SEQ - 1
        self._spool_retry_at = 0.0
        self.stats = OutboxStats()
        if spool is not None:
            self._open_spool(spool)

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory: queued, given back and in flight."""
        held = sum(b.cost for b in self._front) + sum(b.cost for b in self._inflight.values())
        return self._memory_bytes + held

    @property
    def queued_bytes(self) -> int:
        """Bytes in the memory queue proper (not yet cut into a batch)."""
        return self._memory_bytes

    @property
    def queued_items(self) -> int:
        return len(self._memory)

    @property
    def spool_bytes(self) -> int:
        return self._spool_bytes

    @property
    def backlog(self) -> bool:
        """Whether whole batches wait (given back or spooled): send without waiting to fill."""
        return bool(self._front or self._segments)

    @property
    def pending_items(self) -> int:
        """Items not yet delivered, wherever they are."""
        held = len(self._memory) + sum(len(b.items) for b in self._front)
        held += sum(items for _, _, items in self._segments)
        return held + sum(len(b.items) for b in self._inflight.values())

    @property
    def waiting(self) -> bool:
        """Whether anything waits to be taken (in flight does not count)."""
        return bool(self._memory or self._front or self._segments)

    # -- intake ----------------------------------------------------------------------------------

    def put(self, items: Iterable[T]) -> None:
        """Queue items; never blocks. Beyond the memory bound: spill, then drop oldest."""
        cost = self._cost
        for item in items:
            self._memory.append(item)
            self._memory_bytes += cost(item)
        if self.memory_bytes > self.max_bytes:
            self._relieve()

    def _relieve(self) -> None:
        if self._spool is not None and time.monotonic() >= self._spool_retry_at:
            target = int(self.max_bytes * SPILL_TO)
            while self.memory_bytes > target and self._memory:
                if not self._spill_one():
                    break
        while self.memory_bytes > self.max_bytes and self._memory:
            dropped = self._memory.popleft()
            self._memory_bytes -= self._cost(dropped)
            self.stats.dropped["overflow"] += 1

    def _spill_one(self) -> bool:
        count = self._cut(self._memory)
        items = [self._memory[i] for i in range(count)]
        try:
            self._write_segment(items, self._next_seq)
        except OSError as exc:
            self.stats.spool_errors += 1
            self._spool_retry_at = time.monotonic() + 30.0
            if self.stats.spool_errors == 1 or self.stats.spool_errors % 100 == 0:
                _log.error("spool_write_failed", outbox=self.name, error=str(exc),
                           errors=self.stats.spool_errors, then="dropping the oldest beyond the "
                           "memory bound; the spool is tried again in 30 s")
            return False
        self._next_seq += 1
        for _ in range(count):
            self._memory_bytes -= self._cost(self._memory.popleft())
        self.stats.spilled_items += count
        return True

    # -- delivery --------------------------------------------------------------------------------

    def take(self) -> Batch[T] | None:
        """The next batch, oldest first, now in flight; None when there is nothing."""
        batch = self._next_batch()
        if batch is not None:
            if not batch.seq:
                self._taken += 1
                batch.seq = self._taken
            self._inflight[batch.seq] = batch
        return batch

    def done(self, batch: Batch[T]) -> None:
        """The batch is delivered (or dropped for good): forget it."""
        if self._inflight.pop(batch.seq, None) is not None and batch.segment is not None:
            _unlink(batch.segment)

    def give_back(self, batch: Batch[T]) -> None:
        """The batch was not delivered: back to the head, before every later batch."""
        if self._inflight.pop(batch.seq, None) is not None:
            bisect.insort(self._front, batch, key=lambda b: b.seq)

    def _next_batch(self) -> Batch[T] | None:
        if self._front:
            return self._front.pop(0)
        while self._segments:
            path, size, count = self._segments.popleft()
            self._spool_bytes -= size
            try:
                items = self._codec.decode(path.read_bytes())
            except (OSError, ValueError) as exc:
                self.stats.dropped["spool_corrupt"] += count
                _log.error("spool_segment_unreadable", outbox=self.name, path=str(path),
                           items=count, error=str(exc))
                _unlink(path)
                continue
            return Batch(items, sum(self._cost(i) for i in items), path)
        if not self._memory:
            return None
        count = self._cut(self._memory)
        items = [self._memory.popleft() for _ in range(count)]
        cost = sum(self._cost(i) for i in items)
        self._memory_bytes -= cost
        return Batch(items, cost)

    # -- shutdown ------------------------------------------------------------------------------

    def persist(self) -> int:
        """Write everything still in memory to the spool (shutdown); return the items kept.

        Without a spool (or when writing fails) nothing is written and 0 is returned:
        the caller reports those items as unsent.
        """
        if self._spool is None:
            return 0
        for batch in list(self._inflight.values()):
            self.give_back(batch)
        try:
            # Batches given back are older than every segment: they go below the lowest number.
            for batch in reversed(self._front):
                if batch.segment is None:
                    self._write_segment(batch.items, self._low_seq, ahead=True)
                    self._low_seq -= 1
                else:  # still on disk from when it was loaded
                    size = batch.segment.stat().st_size
                    self._segments.appendleft((batch.segment, size, len(batch.items)))
                    self._spool_bytes += size
            self._front.clear()
            while self._memory:
                count = self._cut(self._memory)
                items = [self._memory.popleft() for _ in range(count)]
                self._write_segment(items, self._next_seq)
                self._next_seq += 1
                self._memory_bytes -= sum(self._cost(i) for i in items)
        except OSError as exc:
            self.stats.spool_errors += 1
            _log.error("spool_write_failed", outbox=self.name, error=str(exc), at="shutdown")
        return sum(items for _, _, items in self._segments)

    # -- spool files -----------------------------------------------------------------------------

    def _open_spool(self, spool: Path) -> None:
        try:
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            found = sorted(p for p in spool.iterdir() if p.suffix == ".seg")
        except OSError as exc:
            _log.error("spool_unavailable", outbox=self.name, path=str(spool), error=str(exc))
            self._spool = None
            return
        for path in found:
            try:
                seq_text, count_text = path.stem.split("-")
                seq, count = int(seq_text), int(count_text)
                size = path.stat().st_size
            except (ValueError, OSError):
                continue
            self._segments.append((path, size, count))
            self._spool_bytes += size
            self.stats.restored_items += count
            self._next_seq = max(self._next_seq, seq + 1)
            self._low_seq = min(self._low_seq, seq - 1)
        if found:
            _log.info("spool_restored", outbox=self.name, segments=len(self._segments),
                      items=self.stats.restored_items, bytes=self._spool_bytes)

    def _write_segment(self, items: list[T], seq: int, *, ahead: bool = False) -> None:
        assert self._spool is not None
        data = self._codec.encode(items)
        path = self._spool / f"{seq:016d}-{len(items)}.seg"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            _unlink(tmp)
            raise
        if ahead:
            self._segments.appendleft((path, len(data), len(items)))
        else:
            self._segments.append((path, len(data), len(items)))
        self._spool_bytes += len(data)
        while self._spool_bytes > self._spool_max and len(self._segments) > 1:
            old, size, count = self._segments.popleft()
            self._spool_bytes -= size
            self.stats.dropped["spool_full"] += count
            _unlink(old)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


