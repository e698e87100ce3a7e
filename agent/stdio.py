"""The agent's stdout and stderr, shared by the child's pass-through and the agent's logs.

The child's bytes are written unchanged. The agent's own log lines go to stderr
too, but only between whole lines of the child's stderr: while the child is in
the middle of a line, agent lines wait (a bounded number, oldest dropped and
counted), so an agent line is never spliced into a child line.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque

# Agent log lines held while the child's stderr is mid-line.
MAX_HELD_LINES = 1000


class StdioWriter:
    """Writes to one file descriptor from several threads, whole chunks at a time.

    Args:
        fd: the descriptor (1 or 2).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._mid_line = False
        self._held: deque[bytes] = deque()
        self.broken = False
        self.held_dropped = 0
        self.bytes_discarded = 0

    def write_child(self, data: bytes) -> None:
        """Pass the child's bytes through unchanged (blocking, like the child's own write)."""
        with self._lock:
            cut = data.rfind(b"\n") + 1 if self._held else 0
            if cut:  # release held agent lines at the chunk's last line boundary
                self._write(data[:cut])
                self._release()
                data = data[cut:]
            if data:
                self._write(data)
                self._mid_line = not data.endswith(b"\n")
            else:
                self._mid_line = False

    def write_agent(self, line: bytes) -> None:
        """Write one agent log line (ending in a newline) between child lines."""
        with self._lock:
            if self._mid_line:
                if len(self._held) >= MAX_HELD_LINES:
                    self._held.popleft()
                    self.held_dropped += 1
                self._held.append(line)
            else:
                self._write(line)

    def child_closed(self) -> None:
        """The child's stream ended: release held agent lines, on a fresh line."""
        with self._lock:
            if self._held:
                if self._mid_line:
                    self._write(b"\n")
                self._release()
            self._mid_line = False

    def _release(self) -> None:
        while self._held:
            self._write(self._held.popleft())

    def _write(self, data: bytes) -> None:
        if self.broken:
            self.bytes_discarded += len(data)
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO, errno.ENOSPC):
                    # Nobody reads our output any more: keep draining the child, count the rest.
                    self.broken = True
                    self.bytes_discarded += len(view)
                    return
                raise
            view = view[written:]


STDOUT = StdioWriter(1)
STDERR = StdioWriter(2)
