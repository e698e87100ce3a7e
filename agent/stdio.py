"""The agent's stdout and stderr, shared by the child's pass-through and the agent's logs.

The child's bytes are written unchanged, by the relay thread that read them, and
block it as the child's own write would: a slow reader slows the child, never
the agent. The agent's log lines are only queued by the thread that logs them
(the event loop among others), never written by it, so a stalled reader of
stderr cannot stall the proxy or delivery. They are written between whole lines
of the child's output, by the relay thread at its next line boundary or by a
small writer thread when the child is quiet; while the child is mid-line they
wait. The queue is bounded (lines and bytes): past it the oldest line is dropped
and counted, and one `agent_log_lines_dropped` line after the survivors says how
many.

No lock is held across a blocking `os.write`: one "pen" flag, taken and given
back under a short lock, says which thread may write; the others queue or wait
for it on a condition (only threads other than the event loop ever wait).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime

# Agent log lines held while stderr is busy or the child's stderr is mid-line.
MAX_HELD_LINES = 1000
MAX_HELD_BYTES = 1 << 20


class StdioWriter:
    """Writes one file descriptor for the child's relay thread and the agent's loggers.

    Args:
        fd: the descriptor (1 or 2).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cond = threading.Condition(threading.Lock())
        self._pen = False  # a thread is writing (outside the lock)
        self._mid_line = False  # the child's output so far ends inside a line
        self._held: deque[bytes] = deque()
        self._held_bytes = 0
        self._dropped_unreported = 0
        self._thread: threading.Thread | None = None
        self.broken = False
        self.held_dropped = 0
        self.bytes_discarded = 0

    def counters(self) -> dict[str, int]:
        """The agent's own log lines dropped while this stream was held (a slow reader)."""
        return {"agent_log_lines_dropped": self.held_dropped}

    # ---- the child's side (its relay thread; may block) ------------------------------------

    def write_child(self, data: bytes) -> None:
        """Pass the child's bytes through unchanged (blocking, like the child's own write)."""
        self._take_pen()
        try:
            with self._cond:
                mid_line, waiting = self._mid_line, bool(self._held)
            if waiting and not mid_line:  # lines logged before these bytes go first
                self._write_held()
                waiting = False
            cut = data.rfind(b"\n") + 1 if waiting else 0
            if cut:  # release held agent lines at the chunk's last line boundary
                self._write(data[:cut])
                with self._cond:
                    self._mid_line = False
                self._write_held()
                data = data[cut:]
            if data:
                self._write(data)
            with self._cond:
                self._mid_line = bool(data) and not data.endswith(b"\n")
        finally:
            self._give_pen()

    def child_closed(self) -> None:
        """The child's stream ended: release held agent lines, on a fresh line."""
        self._take_pen()
        try:
            with self._cond:
                newline = self._mid_line and bool(self._held)
                self._mid_line = False
            if newline:
                self._write(b"\n")
            self._write_held()
        finally:
            self._give_pen()

    # ---- the agent's side (any thread; never blocks) ---------------------------------------

    def write_agent(self, line: bytes) -> None:
        """Queue one agent log line (ending in a newline); it is written between child lines."""
        with self._cond:
            self._held.append(line)
            self._held_bytes += len(line)
            while len(self._held) > MAX_HELD_LINES or (self._held_bytes > MAX_HELD_BYTES
                                                       and len(self._held) > 1):
                self._held_bytes -= len(self._held.popleft())
                self.held_dropped += 1
                self._dropped_unreported += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._agent_writer, daemon=True,
                                                name=f"stdio-{self.fd}")
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every queued agent line is written (before exiting).

        A child line left unfinished is ended first. Returns False when the reader did
        not take it all in time (the caller exits anyway: a stuck reader must not hold it).
        """
        done = threading.Event()

        def write_all() -> None:
            self.child_closed()
            done.set()

        threading.Thread(target=write_all, daemon=True, name=f"stdio-{self.fd}-flush").start()
        return done.wait(timeout)

    @property
    def pending_lines(self) -> int:
        """Agent lines queued and not yet written."""
        with self._cond:
            return len(self._held)

    # ---- internals -------------------------------------------------------------------------

    def _agent_writer(self) -> None:
        """Writes queued agent lines whenever nobody else writes and no child line is open."""
        while True:
            with self._cond:
                while not self._held or self._pen or self._mid_line:
                    self._cond.wait()
                self._pen = True
            try:
                self._write_held()
            finally:
                self._give_pen()

    def _take_pen(self) -> None:
        with self._cond:
            while self._pen:
                self._cond.wait()
            self._pen = True

    def _give_pen(self) -> None:
        with self._cond:
            self._pen = False
            self._cond.notify_all()

    def _write_held(self) -> None:
        """Write every queued agent line; the caller holds the pen."""
        while True:
            with self._cond:
                if not self._held:
                    dropped, self._dropped_unreported = self._dropped_unreported, 0
                    break
                line = self._held.popleft()
                self._held_bytes -= len(line)
            self._write(line)
        if dropped:  # once the queue is through, say how many lines did not fit
            self._write(dropped_line(dropped))

    def _write(self, data: bytes) -> None:
        if self.broken:
            self.bytes_discarded += len(data)
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO, errno.ENOSPC):
                    # Nobody reads our output any more: keep draining the child, count the rest.
                    self.broken = True
                    self.bytes_discarded += len(view)
                    return
                raise
            view = view[written:]


def dropped_line(count: int, now: float | None = None) -> bytes:
    """The line that reports agent log lines dropped while stderr could not take them,
    in the agent's JSON log format (written by the writer itself: logging from here
    would queue behind the very lines that did not fit)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    event = {"dropped": count, "reason": "stderr_slow_or_child_mid_line",
             "component": "stdio", "event": "agent_log_lines_dropped",
             "logger": "telemetry-agent", "level": "warning",
             "timestamp": stamp.isoformat().replace("+00:00", "Z")}
    return json.dumps(event).encode() + b"\n"


STDOUT = StdioWriter(1)
STDERR = StdioWriter(2)
