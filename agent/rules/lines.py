"""Turning a child's output bytes into CloudWatch log events.

Three pure stages, each testable alone:

1. `LineFramer` cuts a byte stream into lines. A line that grows past
   `MAX_EVENT_BYTES` without a newline is cut into pieces at UTF-8 boundaries,
   so memory stays bounded whatever the child writes.
2. `to_messages` decodes a piece (invalid UTF-8 becomes U+FFFD) and splits it
   again if the replacement characters made it too long.
3. `EventJoiner` joins lines into multi-line events: indented lines and Python
   tracebacks join the previous event (or, with a start pattern, every line not
   matching it), empty lines are skipped, and an event is complete when the next
   one starts, when the joiner is idle for `IDLE_FLUSH_S`, or at EOF. A traceback
   also joins the line just before it (`logger.exception`'s message, gunicorn's
   `[ERROR] Error handling request ...`) when that line arrived at most
   `TRACEBACK_JOIN_MS` before it and its event holds no traceback yet, so the
   message and its traceback are one event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.model import LogEvent

# PutLogEvents: a batch is at most 1,048,576 bytes counting 26 bytes per event, and an
# event at most 1 MB. Keeping each message to 1,048,576 - 26 bytes guarantees that any
# single event fits a batch on its own, whichever way the service counts the overhead.
MAX_EVENT_BYTES = 1_048_576 - 26
# Half-built multi-line events are flushed after this much quiet (as the CloudWatch agent does).
IDLE_FLUSH_S = 5.0
# A traceback joins the line before it (its header) when it arrived this soon after it. Logging
# writes header and traceback in one write, so they arrive in the same read (0 ms apart). Written
# separately (`print(...)`, then `traceback.print_exc()` line by line) they may come in two
# reads, and the arrival time is the reader thread's, which waits for the GIL (a 5 ms switch
# interval per hop) while the loop frames: 0-9 ms apart measured, more under CPU contention.
# 50 ms covers that; a line that came long before stays its own event.
TRACEBACK_JOIN_MS = 50

_TRACEBACK_START = "Traceback (most recent call last):"
_CHAIN_LINES = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)


def utf8_cut(data: bytes, limit: int) -> int:
    """Largest cut position <= limit that does not split a UTF-8 sequence.

    Backs off over continuation bytes (0b10xxxxxx), at most 3 of them; invalid
    input may still be cut mid-sequence, which decoding then replaces.
    """
    if len(data) <= limit:
        return len(data)
    cut = limit
    for _ in range(3):
        if cut > 0 and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        else:
            break
    if (data[cut] & 0xC0) == 0x80:  # not valid UTF-8 here anyway: cut hard
        return limit
    return cut if cut > 0 else limit


def split_utf8(data: bytes, limit: int = MAX_EVENT_BYTES) -> list[bytes]:
    """Split bytes into pieces of at most `limit` bytes, on UTF-8 boundaries."""
    pieces = []
    while len(data) > limit:
        cut = utf8_cut(data, limit)
        pieces.append(data[:cut])
        data = data[cut:]
    pieces.append(data)
    return pieces


@dataclass(slots=True)
class Piece:
    """A line, or a piece of an over-long line.

    Attributes:
        data: the bytes, without the newline.
        complete: True when a newline ended it in the input.
        timestamp_ms: arrival time of its first byte.
    """

    data: bytes
    complete: bool
    timestamp_ms: int


@dataclass(slots=True)
class LineFramer:
    """Cuts a byte stream into `Piece`s; holds at most `limit` bytes of a partial line."""

    limit: int = MAX_EVENT_BYTES
    _partial: bytearray = field(default_factory=bytearray)
    _partial_ts: int = 0

    def feed(self, data: bytes, timestamp_ms: int) -> list[Piece]:
        """Add bytes that arrived at `timestamp_ms`; return the pieces now complete."""
        out: list[Piece] = []
        if not data:
            return out
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline (possibly empty)
        for line in lines:
            if self._partial:
                self._partial += line
                out.extend(self._drain(self._partial_ts))
                self._finish(out, bytes(self._partial), self._partial_ts)
                self._partial.clear()
            else:
                self._finish(out, line, timestamp_ms)
        if tail:
            if not self._partial:
                self._partial_ts = timestamp_ms
            self._partial += tail
            out.extend(self._drain(self._partial_ts))
        return out

    def feed_lines(self, data: bytes, timestamp_ms: int) -> tuple[int, list[bytes]] | None:
        """Fast path of `feed` for the common case; None when it does not apply.

        Applies when the partial line plus `data` fit in one event, so no line
        can need cutting. Returns the complete lines (the first one completing
        any partial line) and the timestamp of that first line.
        """
        if len(self._partial) + len(data) > self.limit:
            return None
        lines = data.split(b"\n")
        tail = lines.pop()
        first_ts = timestamp_ms
        if self._partial:
            first_ts = self._partial_ts
            if lines:
                lines[0] = bytes(self._partial) + lines[0]
                self._partial.clear()
        if tail:
            if not self._partial:
                self._partial_ts = timestamp_ms
            self._partial += tail
        return first_ts, lines

    def flush(self) -> list[Piece]:
        """At EOF: the last partial line, if any, as a piece without newline."""
        if not self._partial:
            return []
        piece = Piece(bytes(self._partial), False, self._partial_ts)
        self._partial.clear()
        return [piece]

    def _drain(self, ts: int) -> list[Piece]:
        """Emit over-long partial data as pieces, keeping the remainder partial."""
        out = []
        while len(self._partial) > self.limit:
            cut = utf8_cut(bytes(self._partial[: self.limit + 1]), self.limit)
            out.append(Piece(bytes(self._partial[:cut]), False, ts))
            del self._partial[:cut]
        return out

    def _finish(self, out: list[Piece], line: bytes, ts: int) -> None:
        if len(line) > self.limit:
            *heads, last = split_utf8(line, self.limit)
            out.extend(Piece(h, False, ts) for h in heads)
            out.append(Piece(last, True, ts))
        else:
            out.append(Piece(line, True, ts))


def to_messages(data: bytes, limit: int = MAX_EVENT_BYTES) -> list[tuple[str, int]]:
    """Decode a piece to text (U+FFFD for invalid UTF-8) as (message, encoded size) pairs.

    A trailing carriage return (CRLF output) is dropped. Replacement characters
    take 3 bytes, so the decoded text is split again when it grew past `limit`.
    """
    if data.endswith(b"\r"):
        data = data[:-1]
    try:
        text = data.decode("utf-8")
        encoded = data
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return [(text, len(encoded))]
    return [(p.decode("utf-8"), len(p)) for p in split_utf8(encoded, limit)]


@dataclass(slots=True)
class EventJoiner:
    """Joins lines of one stream into multi-line log events.

    Args:
        stream: "stdout" or "stderr", copied into each event.
        start_pattern: when set, only lines matching it start an event.
        limit: the most bytes one event may hold.
        join_ms: a traceback joins the line before it when it arrived at most this much
            later (without a start pattern; see `TRACEBACK_JOIN_MS`).
    """

    stream: str
    start_pattern: re.Pattern[str] | None = None
    limit: int = MAX_EVENT_BYTES
    join_ms: int = TRACEBACK_JOIN_MS
    _lines: list[str] = field(default_factory=list)
    _size: int = 0
    _ts: int = 0
    _last_ts: int = 0  # arrival of the pending event's last line
    _in_traceback: bool = False
    _open_piece: bool = False

    def add(self, piece: Piece) -> list[LogEvent]:
        """Add one piece; return events that are now complete."""
        out: list[LogEvent] = []
        continuing_piece = self._open_piece
        self._open_piece = not piece.complete
        for text, size in to_messages(piece.data, self.limit):
            if not text:
                continue
            if continuing_piece:
                # The rest of an over-long line: its own event, never merged back.
                self._emit(out)
                self._start(text, size, piece.timestamp_ms)
                continue
            continuing_piece = True  # further messages of this piece are continuations
            if (self._lines and self._joins(text, piece.timestamp_ms)
                    and self._size + 1 + size <= self.limit):
                self._lines.append(text)
                self._size += 1 + size
            else:
                self._emit(out)
                self._start(text, size, piece.timestamp_ms)
            self._last_ts = piece.timestamp_ms
            self._track_traceback(text)
        return out

    def add_lines(self, lines: list[bytes], first_ts: int, timestamp_ms: int) -> list[LogEvent]:
        """Add complete lines that each fit an event (from `LineFramer.feed_lines`).

        The same rules as `add`, in one loop with few allocations: this runs for
        every line a busy child prints. Lines that are not valid UTF-8 take the
        general path.
        """
        out: list[LogEvent] = []
        ts = first_ts
        limit, pattern = self.limit, self.start_pattern
        for raw in lines:
            if self._open_piece or not raw or raw[-1] == 13:  # 13 = CR
                out.extend(self.add(Piece(raw, True, ts)))
                ts = timestamp_ms
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                out.extend(self.add(Piece(raw, True, ts)))
                ts = timestamp_ms
                continue
            size = len(raw)
            if not self._lines:
                joins = False
            elif pattern is not None:
                joins = pattern.match(text) is None
            else:
                joins = (text[0] in " \t" or self._in_traceback or text in _CHAIN_LINES
                         or (text[0] == "T" and self._traceback_joins(text, ts)))
            if joins and self._size + 1 + size <= limit:
                self._lines.append(text)
                self._size += 1 + size
            else:
                pending = self._lines
                if len(pending) == 1:
                    out.append(LogEvent(self._ts, pending[0], self.stream, self._size))
                elif pending:
                    self._emit(out)
                self._lines = [text]
                self._size = size
                self._ts = ts
            if self._in_traceback:
                if text[0] not in " \t" and text not in _CHAIN_LINES:
                    self._in_traceback = text.startswith(_TRACEBACK_START)
            elif text[0] == "T" or text[0] == "D":
                self._track_traceback(text)
            self._last_ts = ts
            ts = timestamp_ms
        return out

    def flush(self) -> list[LogEvent]:
        """Emit the pending event (idle timeout or EOF)."""
        out: list[LogEvent] = []
        self._emit(out)
        self._in_traceback = False
        return out

    @property
    def pending(self) -> bool:
        """Whether an event is waiting for its next line."""
        return bool(self._lines)

    def _joins(self, text: str, ts: int) -> bool:
        if self.start_pattern is not None:
            return self.start_pattern.match(text) is None
        if text[0] in " \t":
            return True
        if self._in_traceback:
            return True  # the exception line that closes a traceback
        return text in _CHAIN_LINES or self._traceback_joins(text, ts)

    def _traceback_joins(self, text: str, ts: int) -> bool:
        """Whether `text`, arriving at `ts`, is a traceback that joins the pending event:
        after a chain line, or right after its header line (the pending event's last line
        arrived at most `join_ms` before, and the event holds no traceback of its own, so
        two tracebacks in a row stay two events). Only runs for lines starting with "T"."""
        if not text.startswith(_TRACEBACK_START):
            return False
        if self._chained:
            return True
        return (ts - self._last_ts <= self.join_ms
                and not any(line.startswith(_TRACEBACK_START) for line in self._lines))

    @property
    def _chained(self) -> bool:
        return bool(self._lines) and self._lines[-1] in _CHAIN_LINES

    def _track_traceback(self, text: str) -> None:
        if text.startswith(_TRACEBACK_START) or text in _CHAIN_LINES:
            self._in_traceback = True
        elif self._in_traceback and text[0] not in " \t":
            self._in_traceback = False  # the exception line ended the block

    def _start(self, text: str, size: int, ts: int) -> None:
        self._lines = [text]
        self._size = size
        self._ts = ts

    def _emit(self, out: list[LogEvent]) -> None:
        if self._lines:
            message = self._lines[0] if len(self._lines) == 1 else "\n".join(self._lines)
            out.append(LogEvent(self._ts, message, self.stream, self._size))
            self._lines = []
            self._size = 0
