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

A segment verifies itself (see `frame`): a header with a magic, a format
version, the item count and the payload's length, and a CRC32 over all of it;
the codec's `decode` then checks the payload's shape and ranges in full. A file
that fails any check is moved to a bounded `quarantine/` folder, counted and
logged, and delivery goes on with the next one: no file on disk can stop a
sink. Files are written atomically (temp file, fsync, rename, fsync of the
folder); temp files a crash left behind are removed when the spool opens; a
symlink or a file another user owns is never read (opened with O_NOFOLLOW and
checked with fstat).

Once `start_io` is called from the event loop (the delivery loop does this; an
outbox made inside a running loop calls it itself), every disk operation runs on one worker thread, in submission order, so an
fsync or a slow disk never stalls the loop: a spilled batch stays in memory
(and can be taken from there) until its file is written, and `prefetch` reads
the next segments before `take` asks for them. Without `start_io` (tests,
tools) the same operations run inline.

Batches leave with `take` and end with `done` (delivered, or refused for good)
or `give_back` (not delivered: back to the head, in their original order).
Several may be in flight; the sender decides when that keeps a stream's order.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import os
import queue
import stat
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from agent.log import first_or_every, get_logger

T = TypeVar("T")
R = TypeVar("R")

# When memory overflows into the spool, spill down to this fraction of the bound, so that
# segments are whole batches and an outage does not write one file per submit.
SPILL_TO = 0.75
_FIRST_SEQ = 10**12  # leaves room below for batches written back ahead of the queue
# Segment format: magic, version, 3 zero bytes, item count, payload length, CRC32 of the
# header's first 20 bytes and the payload. Version 1 was bare JSON (see `unframe`).
MAGIC = b"TASG"
VERSION = 2
_HEADER = struct.Struct(">4sB3sIQI")
# No batch the agent writes comes near this (a full PutLogEvents batch of control
# characters escaped as \\u00XX is ~6 MiB); anything larger is not a segment of ours.
MAX_SEGMENT_BYTES = 64 << 20
# The quarantine keeps the newest bad files for a person to look at, within these bounds.
QUARANTINE = "quarantine"
QUARANTINE_MAX_FILES = 20
QUARANTINE_MAX_BYTES = 32 << 20
# While the disk is behind, at most this much (times the memory bound) waits for the worker
# to write it; beyond, spills are written inline.
WRITE_BACKLOG = 1.0
IO_DRAIN_S = 10.0  # how long `persist` waits for queued disk work at shutdown
LOG_EVERY = 100    # rate-limited log lines: the first, then every 100th
_log = get_logger("outbox")


class CorruptSegment(ValueError):
    """A segment's bytes fail a check: framing, checksum, version, shape or a value's range.

    Every codec's `decode` raises this (and only this) for bad content, so the outbox
    can tell a bad file (quarantine it, go on) from a bug.
    """


class UnsafeFile(OSError):
    """A spool entry that must not be read: a symlink, not a regular file, or not ours."""


@dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """How a batch becomes a segment's payload and back.

    `decode` must be total: for any bytes it returns the batch or raises `CorruptSegment`.
    """

    encode: Callable[[list[T]], bytes]
    decode: Callable[[bytes], list[T]]


@dataclass(slots=True, eq=False)
class _Segment(Generic[T]):
    """One batch in the spool's order: on disk, being written, or (prefetched) both."""

    seq: int
    count: int
    path: Path
    size: int = 0                 # bytes on disk, once written (or found at start)
    items: list[T] | None = None  # held in memory: not yet written, write failed, prefetched
    cost: int = 0                 # memory cost of `items`
    on_disk: bool = False
    writing: bool = False
    queued: bool = True           # in the outbox's segment queue (not taken or evicted)


@dataclass(slots=True)
class Batch(Generic[T]):
    """A batch taken from an outbox: its items, in order."""

    items: list[T]
    cost: int
    source: _Segment[T] | None = None  # the spool file that holds it, deleted on delivery
    seq: int = 0                       # take order, so batches given back keep their order


@dataclass(slots=True)
class OutboxStats:
    """Counters for self-telemetry and the last log line."""

    dropped: dict[str, int] = field(default_factory=lambda: {
        "overflow": 0, "spool_full": 0, "spool_corrupt": 0})
    spilled_items: int = 0
    spool_errors: int = 0
    restored_items: int = 0
    quarantined_segments: int = 0  # failed a check: moved to quarantine/ (or deleted)
    skipped_files: int = 0         # symlinks, non-regular files, files of another user
    temp_files_removed: int = 0    # left by a crash mid-write
    legacy_segments: int = 0       # version-1 (bare JSON) segments read

    def counters(self) -> dict[str, int]:
        """Every counter, flat (`dropped_<reason>` for drops)."""
        out = {f"dropped_{k}": v for k, v in self.dropped.items()}
        out.update(spilled_items=self.spilled_items, spool_errors=self.spool_errors,
                   restored_items=self.restored_items,
                   quarantined_segments=self.quarantined_segments,
                   skipped_files=self.skipped_files, temp_files_removed=self.temp_files_removed,
                   legacy_segments=self.legacy_segments)
        return out


# -- the segment format (pure) -------------------------------------------------------------------

def frame(payload: bytes, items: int) -> bytes:
    """A segment's bytes: the versioned, checksummed header, then the codec's payload."""
    head = _HEADER.pack(MAGIC, VERSION, b"\0\0\0", items, len(payload), 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + crc.to_bytes(4, "big") + payload


def unframe(data: bytes) -> tuple[bytes, int | None]:
    """The payload and item count of a segment's bytes; raises `CorruptSegment`.

    A version-1 segment (what agents before the versioned format wrote: the codec's JSON,
    which starts with `[`) is returned as is with no count, for the codec's strict decode
    to judge: an upgrade during an outage keeps its spool.
    """
    if data[:1] == b"[":
        return data, None
    if len(data) < _HEADER.size:
        raise CorruptSegment(f"truncated header ({len(data)} bytes)")
    magic, version, pad, items, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptSegment("not a segment (bad magic)")
    if version != VERSION or pad != b"\0\0\0":
        raise CorruptSegment(f"unknown segment version {version}")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise CorruptSegment(f"payload is {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload, zlib.crc32(data[:_HEADER.size - 4])) != crc:
        raise CorruptSegment("checksum mismatch")
    return payload, items


def decode_segment(data: bytes, decode: Callable[[bytes], list[T]], count: int
                   ) -> tuple[list[T], bool]:
    """A segment's items and whether it was a legacy one; raises `CorruptSegment` only.

    `count` is the item count in the file's name; header, payload and name must agree.
    Any exception from the codec counts as corruption too (a codec bug must not stop
    delivery; `CorruptSegment` is the codec's contract, this is the safety net).
    """
    payload, items = unframe(data)
    try:
        batch = decode(payload)
    except CorruptSegment:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of decode means a bad file
        raise CorruptSegment(f"undecodable: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, list) or not batch:
        raise CorruptSegment("empty batch")
    if len(batch) != count or (items is not None and items != count):
        raise CorruptSegment(f"{len(batch)} items, header says {items}, name says {count}")
    return batch, items is None


def read_segment(path: Path) -> bytes:
    """A segment file's bytes, never through a symlink and only if it is ours.

    Raises `UnsafeFile` (a symlink, not a regular file, another user's), `CorruptSegment`
    (too large) or `OSError`.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeFile(f"symlink: {exc}") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile("not a regular file")
        if info.st_uid != os.geteuid():
            raise UnsafeFile(f"owned by uid {info.st_uid}, not {os.geteuid()}")
        if info.st_size > MAX_SEGMENT_BYTES:
            raise CorruptSegment(f"{info.st_size} bytes: larger than any segment")
        return f.read(MAX_SEGMENT_BYTES + 1)


def write_file(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write `data` to `path` atomically and durably: temp file, fsync, rename, fsync dir."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        _unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make renames and unlinks in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine(path: Path, folder: Path, *, max_files: int = QUARANTINE_MAX_FILES,
               max_bytes: int = QUARANTINE_MAX_BYTES) -> bool:
    """Move a bad segment into `folder` (kept within its bounds, oldest removed first).

    Returns whether the file was kept there; when the folder is unusable (or the file
    alone is over the bound) the file is deleted instead, so it cannot be hit again.
    """
    kept = False
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            os.replace(path, folder / f"{time.time_ns():020d}-{path.name}")
            kept = True
            _prune(folder, max_files, max_bytes)
    except OSError:
        pass
    if not kept:
        _unlink(path)
    return kept


def _prune(folder: Path, max_files: int, max_bytes: int) -> None:
    """Remove the oldest quarantined files (names start with the time) beyond the bounds."""
    files = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            files.append((entry.name, entry.stat(follow_symlinks=False).st_size))
    files.sort()
    total = sum(size for _, size in files)
    while files and (len(files) > max_files or total > max_bytes):
        name, size = files.pop(0)
        _unlink(folder / name)
        total -= size


class _Worker:
    """One daemon thread that runs disk operations in submission order.

    A daemon, so a disk that hangs cannot hang the agent's exit; `drain` waits with a limit.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"spool-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], R]) -> Future[R]:
        future: Future[R] = Future()
        self._jobs.put((fn, future))
        return future

    def drain(self, timeout: float) -> bool:
        """Wait until every job submitted so far has run; False if that took too long."""
        try:
            self.submit(lambda: None).result(timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop the thread once the jobs queued so far have run."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)


def _every(count: int) -> bool:
    """Rate limit for log lines: the first, then every `LOG_EVERY`th."""
    return first_or_every(count, LOG_EVERY)


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
        expendable: items to drop first: over the memory bound, these go (oldest first,
            counted as `dropped_expendable`) before anything is spilled or dropped.
    """

    def __init__(self, name: str, *, max_bytes: int, cost: Callable[[T], int],
                 cut: Callable[[Sequence[T]], int], codec: Codec[T],
                 spool: Path | None = None, spool_max_bytes: int = 0,
                 expendable: Callable[[T], bool] | None = None) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self._cost = cost
        self._cut = cut
        self._codec = codec
        self._spool = spool
        self._spool_max = spool_max_bytes
        self._expendable = expendable
        self._memory: deque[T] = deque()
        self._memory_bytes = 0
        self._front: list[Batch[T]] = []  # given back, oldest first
        self._inflight: dict[int, Batch[T]] = {}
        self._taken = 0
        self._segments: deque[_Segment[T]] = deque()
        self._spool_bytes = 0
        self._held_bytes = 0     # items of queued segments not (yet) on disk
        self._cached_bytes = 0   # items of queued segments read ahead (a copy of the disk)
        self._writing_bytes = 0  # the part of that waiting to be written
        self._next_seq = _FIRST_SEQ
        self._low_seq = _FIRST_SEQ - 1
        self._spool_retry_at = 0.0
        self._worker: _Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._written: deque[tuple[_Segment[T], int, BaseException | None]] = deque()
        self.stats = OutboxStats()
        if spool is not None:
            self._open_spool(spool)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # made outside an event loop: disk work stays inline until `start_io`
        else:
            self.start_io()

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory: queued, given back, in flight and waiting to be written.

        Not counted: the few segments `prefetch` read ahead (at most the sender's parallel
        batches): they are a copy of what is on disk, not data the bound must protect.
        """
        held = sum(b.cost for b in self._front) + sum(b.cost for b in self._inflight.values())
        return self._memory_bytes + self._held_bytes + held

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
        held += sum(s.count for s in self._segments)
        return held + sum(len(b.items) for b in self._inflight.values())

    @property
    def waiting(self) -> bool:
        """Whether anything waits to be taken (in flight does not count)."""
        return bool(self._memory or self._front or self._segments)

    def counters(self) -> dict[str, int]:
        """Every counter and gauge, flat, for self-telemetry."""
        return self.stats.counters() | {"pending_items": self.pending_items,
                                        "memory_bytes": self.memory_bytes,
                                        "spool_bytes": self.spool_bytes}

    # -- background disk work ----------------------------------------------------------------

    def start_io(self) -> None:
        """From now on, do disk work on a worker thread (call from the running event loop)."""
        if self._spool is not None and self._worker is None:
            self._loop = asyncio.get_running_loop()
            self._worker = _Worker(self.name)

    def _submit(self, fn: Callable[[], R]) -> Future[R] | None:
        """Run `fn` on the worker (in order), or now when there is none."""
        if self._worker is not None:
            return self._worker.submit(fn)
        fn()
        return None

    def _reap(self) -> None:
        """Apply the writes the worker finished (on the loop, or inline without one)."""
        while self._written:
            self._after_write(*self._written.popleft())

    async def settle(self) -> None:
        """Wait until the disk work queued so far is done and applied."""
        if self._worker is not None:
            await asyncio.wrap_future(self._worker.submit(lambda: None))
        self._reap()

    async def prefetch(self, count: int) -> None:
        """Read the first `count` spooled segments into memory on the worker, so `take`
        does no disk I/O on the loop. Bad files are quarantined on the way."""
        self._reap()
        worker = self._worker
        if worker is None:
            return
        while True:
            entry = next((s for s in itertools.islice(self._segments, count)
                          if s.items is None), None)
            if entry is None:
                return
            future = worker.submit(functools.partial(read_segment, entry.path))
            try:
                data: bytes | None = await asyncio.wrap_future(future)
                error: BaseException | None = None
            except (OSError, CorruptSegment) as exc:
                data, error = None, exc
            if not entry.queued or entry.items is not None:
                continue  # taken or evicted meanwhile
            items = self._check(entry, data, error)
            if items is not None:
                entry.items = items
                entry.cost = sum(self._cost(i) for i in items)
                self._cached_bytes += entry.cost

    # -- intake ----------------------------------------------------------------------------------

    def put(self, items: Iterable[T]) -> None:
        """Queue items; never blocks. Beyond the memory bound: spill, then drop oldest."""
        self._reap()
        cost = self._cost
        for item in items:
            self._memory.append(item)
            self._memory_bytes += cost(item)
        if self._over_bound() > 0:
            self._relieve()

    def _shed_expendable(self) -> None:
        """Over the bound, drop expendable items first, oldest first: down to the spill
        target with a spool (so none of them is spilled while others wait), else to the
        bound. Only the other items then spill or, without a spool, are dropped."""
        if self._expendable is None:
            return
        target = int(self.max_bytes * SPILL_TO) if self._spool is not None else self.max_bytes
        excess = self._over_bound() + self.max_bytes - target
        if excess <= 0 or not any(self._expendable(i) for i in self._memory):
            return
        kept: deque[T] = deque()
        dropped = 0
        for item in self._memory:
            if excess > 0 and self._expendable(item):
                cost = self._cost(item)
                excess -= cost
                self._memory_bytes -= cost
                dropped += 1
            else:
                kept.append(item)
        self._memory = kept
        self.stats.dropped["expendable"] = self.stats.dropped.get("expendable", 0) + dropped

    def _over_bound(self) -> int:
        """Bytes beyond the memory bound, not counting up to one bound's worth of batches
        waiting for the disk (they leave memory as soon as it catches up)."""
        waiting = min(self._writing_bytes, int(self.max_bytes * WRITE_BACKLOG))
        return self.memory_bytes - waiting - self.max_bytes

    def _relieve(self) -> None:
        self._shed_expendable()
        if self._spool is not None and time.monotonic() >= self._spool_retry_at:
            target = int(self.max_bytes * SPILL_TO)
            while self._memory and self._over_bound() + self.max_bytes > target:
                # On the worker while the disk keeps up; inline once it is a whole bound
                # behind (or a single put brings several bounds): the loop then waits for
                # the disk, as a full memory bound must, rather than dropping.
                behind = self._writing_bytes >= self.max_bytes * WRITE_BACKLOG
                if not self._spill_one(background=self._worker is not None and not behind):
                    break
        while self._over_bound() > 0 and self._memory:
            dropped = self._memory.popleft()
            self._memory_bytes -= self._cost(dropped)
            self.stats.dropped["overflow"] += 1

    def _spill_one(self, *, background: bool) -> bool:
        """Cut one batch off memory into a segment; False if the spool failed (inline)."""
        count = self._cut(self._memory)
        items = [self._memory[i] for i in range(count)]
        entry = self._new_segment(items, self._next_seq)
        if not background:
            try:
                size = self._write_now(entry, items=items)
            except OSError as exc:
                self._write_failed(exc)
                return False
        self._next_seq += 1
        for _ in range(count):
            self._memory_bytes -= self._cost(self._memory.popleft())
        self.stats.spilled_items += count
        if not background:
            entry.on_disk, entry.size = True, size
            self._enqueue(entry)
        else:
            entry.cost = sum(self._cost(i) for i in items)
            entry.items, entry.writing = items, True
            self._held_bytes += entry.cost
            self._writing_bytes += entry.cost
            self._segments.append(entry)
            self._submit_write(entry)
        return True

    def _new_segment(self, items: list[T], seq: int) -> _Segment[T]:
        assert self._spool is not None
        return _Segment(seq, len(items), self._spool / f"{seq:016d}-{len(items)}.seg")

    def _encode(self, items: list[T]) -> bytes:
        return frame(self._codec.encode(items), len(items))

    def _write_now(self, entry: _Segment[T], *, sync_dir: bool = True,
                   items: list[T] | None = None) -> int:
        data = self._encode(items if items is not None else entry.items or [])
        write_file(entry.path, data, sync_dir=sync_dir)
        return len(data)

    def _submit_write(self, entry: _Segment[T]) -> None:
        items = entry.items
        assert items is not None and self._worker is not None

        def job() -> None:
            try:
                size, error = self._write_now(entry, items=items), None
            except Exception as exc:  # noqa: BLE001 - reported on the loop
                size, error = 0, exc
            self._written.append((entry, size, error))
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._reap)
                except RuntimeError:
                    pass  # the loop closed meanwhile; `persist` or the next call reaps

        self._worker.submit(job)

    def _after_write(self, entry: _Segment[T], size: int, error: BaseException | None) -> None:
        """A background write ended: free the items (written) or keep them in memory."""
        entry.writing = False
        if entry.queued:
            self._writing_bytes -= entry.cost
        if error is not None:
            self._write_failed(error)  # the batch stays in memory and is delivered from there
            return
        entry.on_disk, entry.size = True, size
        if entry.queued:
            self._spool_bytes += size
            self._held_bytes -= entry.cost
            entry.items, entry.cost = None, 0
            self._evict()

    def _write_failed(self, exc: BaseException) -> None:
        self.stats.spool_errors += 1
        self._spool_retry_at = time.monotonic() + 30.0
        if _every(self.stats.spool_errors):
            _log.error("spool_write_failed", outbox=self.name, error=str(exc),
                       errors=self.stats.spool_errors, then="dropping the oldest beyond the "
                       "memory bound; the spool is tried again in 30 s")

    def _enqueue(self, entry: _Segment[T], *, ahead: bool = False) -> None:
        """Add a segment that is on disk to the queue and keep the spool within its bound."""
        entry.queued = True
        if ahead:
            self._segments.appendleft(entry)
        else:
            self._segments.append(entry)
        self._spool_bytes += entry.size
        self._evict()

    def _evict(self) -> None:
        """Drop the oldest segments on disk while the spool is over its bound."""
        while self._spool_bytes > self._spool_max:
            on_disk = [s for s in self._segments if s.on_disk and not s.writing]
            if len(on_disk) <= 1:
                return
            old = on_disk[0]
            self._segments.remove(old)
            self._release(old)
            self.stats.dropped["spool_full"] += old.count
            self._submit(functools.partial(_unlink, old.path))

    def _release(self, entry: _Segment[T]) -> None:
        """`entry` leaves the queue: take its bytes off the spool's and memory's totals."""
        entry.queued = False
        if entry.on_disk:
            self._spool_bytes -= entry.size
        if entry.items is not None:
            if entry.on_disk:
                self._cached_bytes -= entry.cost
            else:
                self._held_bytes -= entry.cost
        if entry.writing:
            self._writing_bytes -= entry.cost

    # -- delivery --------------------------------------------------------------------------------

    def take(self) -> Batch[T] | None:
        """The next batch, oldest first, now in flight; None when there is nothing."""
        self._reap()
        batch = self._next_batch()
        if batch is not None:
            if not batch.seq:
                self._taken += 1
                batch.seq = self._taken
            self._inflight[batch.seq] = batch
        return batch

    def done(self, batch: Batch[T]) -> None:
        """The batch is delivered (or dropped for good): forget it."""
        if self._inflight.pop(batch.seq, None) is not None and batch.source is not None:
            # after its write, if that is still queued
            self._submit(functools.partial(_unlink, batch.source.path))

    def give_back(self, batch: Batch[T]) -> None:
        """The batch was not delivered: back to the head, before every later batch."""
        if self._inflight.pop(batch.seq, None) is not None:
            bisect.insort(self._front, batch, key=lambda b: b.seq)

    def _next_batch(self) -> Batch[T] | None:
        if self._front:
            return self._front.pop(0)
        while self._segments:
            entry = self._segments.popleft()
            items = entry.items
            self._release(entry)
            entry.items, entry.cost = None, 0  # the batch holds them now
            if items is None:  # not prefetched: read it here
                try:
                    data: bytes | None = read_segment(entry.path)
                    error: BaseException | None = None
                except (OSError, CorruptSegment) as exc:
                    data, error = None, exc
                items = self._check(entry, data, error)
                if items is None:
                    continue
            return Batch(items, sum(self._cost(i) for i in items), entry)
        if not self._memory:
            return None
        count = self._cut(self._memory)
        items = [self._memory.popleft() for _ in range(count)]
        cost = sum(self._cost(i) for i in items)
        self._memory_bytes -= cost
        return Batch(items, cost)

    def _check(self, entry: _Segment[T], data: bytes | None, error: BaseException | None
               ) -> list[T] | None:
        """A read segment's items, or None after dealing with a bad or unsafe file."""
        if data is not None:
            try:
                items, legacy = decode_segment(data, self._codec.decode, entry.count)
            except CorruptSegment as exc:
                error = exc
            else:
                self.stats.legacy_segments += legacy
                return items
        if entry.queued:
            self._segments.remove(entry)
            self._release(entry)
        self.stats.dropped["spool_corrupt"] += entry.count
        if isinstance(error, UnsafeFile):
            self.stats.skipped_files += 1
            if _every(self.stats.skipped_files):
                _log.error("spool_file_skipped", outbox=self.name, path=str(entry.path),
                           reason=str(error), skipped=self.stats.skipped_files,
                           then="left in place, never read")
        elif isinstance(error, CorruptSegment):
            self.stats.quarantined_segments += 1
            if _every(self.stats.quarantined_segments):
                _log.error("spool_segment_quarantined", outbox=self.name, path=str(entry.path),
                           items=entry.count, error=str(error),
                           quarantined=self.stats.quarantined_segments,
                           then=f"moved to {QUARANTINE}/; delivery goes on with the next")
            path, folder = entry.path, entry.path.parent / QUARANTINE
            self._submit(functools.partial(quarantine, path, folder))
        else:
            self.stats.spool_errors += 1
            if _every(self.stats.spool_errors):
                _log.error("spool_segment_unreadable", outbox=self.name, path=str(entry.path),
                           items=entry.count, error=str(error))
        return None

    # -- shutdown ------------------------------------------------------------------------------

    def persist(self) -> int:
        """Write everything still in memory to the spool (shutdown); return the items kept.

        Without a spool (or when writing fails) nothing is written and 0 is returned:
        the caller reports those items as unsent.
        """
        if self._spool is None:
            return 0
        # Inline from here on, *before* the finished writes are applied: applying one can
        # evict (unlink) an older segment, and that unlink must be done when the count below
        # is returned, not still queued on a thread nobody waits for (the next agent would
        # find the file, deliver items counted as dropped, or lose it between scan and read).
        worker, self._worker = self._worker, None
        # A write that finishes after the drain gave up is never applied: its eviction would
        # unlink a segment already counted as kept (its own items stay counted as unsent).
        self._loop = None
        if worker is not None:
            if not worker.drain(IO_DRAIN_S):
                _log.error("spool_write_failed", outbox=self.name, at="shutdown",
                           error=f"the disk did not finish queued writes in {IO_DRAIN_S} s")
            worker.close()
        self._reap()
        for batch in list(self._inflight.values()):
            self.give_back(batch)
        try:
            # Segments whose write failed are still in memory: write them where they are.
            for entry in [s for s in self._segments if not s.on_disk and not s.writing]:
                entry.size = self._write_now(entry, sync_dir=False)
                entry.on_disk = True
                self._spool_bytes += entry.size
            # Batches given back are older than every segment: they go below the lowest number.
            for batch in reversed(self._front):
                source = batch.source
                if source is None or not source.on_disk:
                    source = self._new_segment(batch.items, self._low_seq)
                    source.size = self._write_now(source, sync_dir=False, items=batch.items)
                    source.on_disk = True
                    self._low_seq -= 1
                self._enqueue(source, ahead=True)
            self._front.clear()
            while self._memory:
                count = self._cut(self._memory)
                items = [self._memory.popleft() for _ in range(count)]
                entry = self._new_segment(items, self._next_seq)
                entry.size = self._write_now(entry, sync_dir=False, items=items)
                entry.on_disk = True
                self._enqueue(entry)
                self._next_seq += 1
                self._memory_bytes -= sum(self._cost(i) for i in items)
            fsync_dir(self._spool)
        except OSError as exc:
            self.stats.spool_errors += 1
            _log.error("spool_write_failed", outbox=self.name, error=str(exc), at="shutdown")
        return sum(s.count for s in self._segments if s.on_disk)

    # -- opening the spool -----------------------------------------------------------------------

    def _open_spool(self, spool: Path) -> None:
        """Find the segments a previous agent left; remove its temp files; skip unsafe files."""
        try:
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            entries = sorted(os.scandir(spool), key=lambda e: e.name)
        except OSError as exc:
            _log.error("spool_unavailable", outbox=self.name, path=str(spool), error=str(exc))
            self._spool = None
            return
        uid = os.geteuid()
        for entry in entries:
            name = entry.name
            if not name.endswith((".seg", ".tmp")):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
                self.stats.skipped_files += 1
                if _every(self.stats.skipped_files):
                    _log.error("spool_file_skipped", outbox=self.name, path=entry.path,
                               skipped=self.stats.skipped_files, then="left in place, never read",
                               reason="a symlink, not a regular file, or owned by another user")
                continue
            if name.endswith(".tmp"):  # a write a crash interrupted: never renamed, not data
                _unlink(Path(entry.path))
                self.stats.temp_files_removed += 1
                continue
            try:
                seq_text, count_text = name.removesuffix(".seg").split("-")
                seq, count = int(seq_text), int(count_text)
            except ValueError:
                continue
            if count < 1:
                continue
            self._segments.append(_Segment(seq, count, Path(entry.path), info.st_size,
                                           on_disk=True))
            self._spool_bytes += info.st_size
            self.stats.restored_items += count
            self._next_seq = max(self._next_seq, seq + 1)
            self._low_seq = min(self._low_seq, seq - 1)
        if self._segments or self.stats.temp_files_removed or self.stats.skipped_files:
            _log.info("spool_restored", outbox=self.name, segments=len(self._segments),
                      items=self.stats.restored_items, bytes=self._spool_bytes,
                      temp_files_removed=self.stats.temp_files_removed,
                      skipped_files=self.stats.skipped_files)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
