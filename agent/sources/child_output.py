"""The child's stdout and stderr: passed through unchanged, and turned into log events.

One reader thread per pipe does the blocking work: read what the child wrote,
write it to the agent's own stdout/stderr, and hand the bytes to a bounded
`Intake`. The thread never waits on a sink, so a slow or stalled sink can never
block the child; the only thing that can slow the child is the agent's own
stdout, exactly as it would without the agent. When the intake is full the new
bytes are dropped and counted, and the framer is told there was a gap so it
does not glue the ends of two different lines together.

On the event loop, `ChildOutputSource.run` frames the bytes into lines and
multi-line events (see `agent.rules.lines`) and emits them in arrival order.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.log import get_logger
from agent.model import LogEvent
from agent.rules.lines import IDLE_FLUSH_S, EventJoiner, LineFramer
from agent.stdio import StdioWriter
from agent.tasks import supervise

_log = get_logger("child_output")

# Reads and pipes of 1 MiB: the reader thread needs the GIL once per read, and the loop
# thread holds it while framing, so big reads keep pass-through fast under load. A big
# pipe also gives the child more room before its writes could ever wait.
READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20
DEFAULT_INTAKE_BYTES = 16 << 20
SATURATED_WAIT_S = 0.005
TAKE_LIMIT = 2 << 20  # framed per turn, so a saturated sink is noticed between turns
Emit = Callable[[list[LogEvent]], None]
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


@dataclass(slots=True)
class Chunk:
    """Bytes read from one stream, with their arrival time; `data=None` marks EOF."""

    stream: str
    data: bytes | None
    timestamp_ms: int
    gap: bool = False


class Intake:
    """A bounded, thread-safe hand-over of chunks from reader threads to the loop.

    Args:
        loop: the event loop that consumes.
        max_bytes: the bound; beyond it new bytes are dropped and counted.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_bytes: int = DEFAULT_INTAKE_BYTES) -> None:
        self._loop = loop
        self._max = max_bytes
        self._lock = threading.Lock()
        self._chunks: deque[Chunk] = deque()
        self._bytes = 0
        self._gap: set[str] = set()
        self._signalled = False
        self._ready = asyncio.Event()
        self.dropped_bytes = 0
        self.received_bytes = 0

    def push(self, stream: str, data: bytes | None) -> None:
        """Called from a reader thread; never blocks on the consumer."""
        ts = time.time_ns() // 1_000_000
        with self._lock:
            if data is not None:
                self.received_bytes += len(data)
                if self._bytes + len(data) > self._max:
                    self.dropped_bytes += len(data)
                    self._gap.add(stream)
                    return
                self._bytes += len(data)
            gap = stream in self._gap
            self._gap.discard(stream)
            self._chunks.append(Chunk(stream, data, ts, gap))
            if self._signalled:
                return
            self._signalled = True
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # loop closed during shutdown
            pass

    async def take(self, timeout: float | None, limit: int = TAKE_LIMIT) -> list[Chunk]:
        """Wait up to `timeout` seconds for chunks; return those queued, about `limit` bytes."""
        if not self._chunks:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        return self.take_now(limit)

    @property
    def nearly_full(self) -> bool:
        """Whether one more read might not fit."""
        return self._bytes >= self._max - READ_SIZE

    def take_now(self, limit: int | None = None) -> list[Chunk]:
        """Return queued chunks without waiting: all, or about `limit` bytes of them."""
        with self._lock:
            if limit is None or self._bytes <= limit:
                self._ready.clear()
                self._signalled = False
                chunks = list(self._chunks)
                self._chunks.clear()
                self._bytes = 0
                return chunks
            chunks, size = [], 0
            while self._chunks and size < limit:
                chunk = self._chunks.popleft()
                chunks.append(chunk)
                size += len(chunk.data or b"")
            self._bytes -= size
            return chunks


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Grow a pipe's buffer (Linux F_SETPIPE_SZ); return the size it has."""
    try:
        return fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:  # above /proc/sys/fs/pipe-max-size for this user: keep what we have
        try:
            return fcntl.fcntl(fd, F_GETPIPE_SZ)
        except OSError:
            return 0


def relay(fd: int, stream: str, writer: StdioWriter, intake: Intake) -> None:
    """Reader-thread body: child pipe -> pass-through and intake, until EOF."""
    enlarge_pipe(fd)
    try:
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:
                break
            if not data:
                break
            writer.write_child(data)
            intake.push(stream, data)
    finally:
        writer.child_closed()
        intake.push(stream, None)
        os.close(fd)


class ChildOutputSource:
    """Frames the child's output into log events.

    Args:
        intake: where the reader threads put bytes.
        streams: the stream names whose EOF ends the source.
        start_pattern: optional multi-line start pattern.
        idle_flush_s: quiet time after which a half-built event is emitted.
    """

    name = "child_output"

    def __init__(self, intake: Intake, streams: tuple[str, ...] = ("stdout", "stderr"),
                 start_pattern: re.Pattern[str] | None = None,
                 idle_flush_s: float = IDLE_FLUSH_S, *, emit: Emit | None = None,
                 saturated: Callable[[], bool] = lambda: False) -> None:
        self._intake = intake
        self._open = set(streams)
        self._framers = {s: LineFramer() for s in streams}
        self._joiners = {s: EventJoiner(s, start_pattern) for s in streams}
        self._last = dict.fromkeys(streams, 0.0)
        self._idle = idle_flush_s
        self._emit = emit
        self._saturated = saturated
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.events = 0
        self.finished = asyncio.Event()

    # -- the Source protocol --------------------------------------------------------------------

    def follow(self, fd: int, stream: str, writer: StdioWriter) -> None:
        """Relay one of the child's pipes (a thread: the child's writes never wait on the
        loop) to the agent's own `writer` and into the intake."""
        threading.Thread(target=relay, args=(fd, stream, writer, self._intake), daemon=True,
                         name=f"relay-{stream}").start()

    async def start(self) -> None:
        """Frame and emit (to the `emit` given) until every stream reaches EOF or `stop`."""
        assert self._emit is not None
        emit, saturated = self._emit, self._saturated
        self._task = supervise(self.name, lambda: self.run(emit, saturated))

    async def stop(self, deadline: float) -> None:
        """Wait for the pipes' EOF until `deadline` (a descendant may hold them open), then
        frame what is queued and emit every half-built event. Once: a second call (the
        shutdown's, after the agent already waited for the child's pipes) returns at once."""
        if self._stopped:
            return
        self._stopped = True
        wait = max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(wait):
                await self.finished.wait()
        except TimeoutError:
            _log.warning("child_pipes_still_open", reason="a descendant holds them",
                         waited_s=round(wait, 1))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._emit is not None:
            self.drain(self._emit)

    def counters(self) -> dict[str, int]:
        return {"child_output_bytes": self._intake.received_bytes,
                "child_output_dropped_bytes": self._intake.dropped_bytes,
                "log_events_framed": self.events}

    async def run(self, emit: Emit, saturated: Callable[[], bool] = lambda: False) -> None:
        """Frame and emit until every stream reached EOF.

        While `saturated()` (the sink's memory is full) framing pauses and bytes wait in
        the intake instead, so both bounds are used before anything is dropped, and the
        sink's delivery gets the loop to itself meanwhile (a flood cannot starve it). The
        child is not slowed: the reader threads keep draining its pipes into the intake,
        until it is nearly full too; then framing resumes, the sink drops its oldest
        (counted), and delivery still gets a turn between framing turns.
        """
        try:
            while self._open:
                while saturated() and not self._intake.nearly_full:
                    await asyncio.sleep(SATURATED_WAIT_S)
                if saturated():  # both bounds reached: frame on (the sink drops its oldest),
                    await asyncio.sleep(0)  # but let delivery run between turns
                chunks = await self._intake.take(self._timeout())
                now = time.monotonic()
                out: list[LogEvent] = []
                for chunk in chunks:
                    self._handle(chunk, now, out)
                for stream, joiner in self._joiners.items():
                    if joiner.pending and now - self._last[stream] >= self._idle:
                        out.extend(joiner.flush())
                if out:
                    self.events += len(out)
                    emit(out)
        finally:
            if not self._open:  # not after a crash: the supervisor starts it again
                self.finished.set()

    def drain(self, emit: Emit) -> None:
        """Shutdown: frame what is still queued and emit every half-built event."""
        out: list[LogEvent] = []
        now = time.monotonic()
        for chunk in self._intake.take_now():
            if chunk.stream in self._open:
                self._handle(chunk, now, out)
        for stream in list(self._open):
            self._handle(Chunk(stream, None, 0), now, out)
        if out:
            self.events += len(out)
            emit(out)

    def _handle(self, chunk: Chunk, now: float, out: list[LogEvent]) -> None:
        framer, joiner = self._framers[chunk.stream], self._joiners[chunk.stream]
        self._last[chunk.stream] = now
        if chunk.gap:
            for piece in framer.flush():
                out.extend(joiner.add(piece))
            out.extend(joiner.flush())
        if chunk.data is None:
            for piece in framer.flush():
                out.extend(joiner.add(piece))
            out.extend(joiner.flush())
            self._open.discard(chunk.stream)
            return
        fast = framer.feed_lines(chunk.data, chunk.timestamp_ms)
        if fast is not None:
            out.extend(joiner.add_lines(fast[1], fast[0], chunk.timestamp_ms))
            return
        for piece in framer.feed(chunk.data, chunk.timestamp_ms):
            out.extend(joiner.add(piece))

    def _timeout(self) -> float | None:
        waits = [self._idle - (time.monotonic() - self._last[s])
                 for s, j in self._joiners.items() if j.pending]
        return max(0.0, min(waits)) if waits else None
