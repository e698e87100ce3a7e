"""The file sink: one JSON line per AWS call the agent makes, or would make in a dry run.

Format (docs/metrics.md): `{"time": ISO-8601, "api": "PutLogEvents", "params": {...}}`,
where `params` are exactly the keyword arguments given to boto3, datetimes as
ISO-8601 strings. Writing happens in a worker thread fed by a bounded queue, so
a slow or blocked file (a full disk, a FIFO nobody reads) never stalls the
pipeline: records beyond the bound are dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from agent.log import first_or_every, get_logger

MAX_PENDING_RECORDS = 10_000
# What the sink may hold in memory, queued or being written: a record of a full PutLogEvents
# batch is about 1 MB, so 10,000 records alone could be 10 GB (367 MB RSS was seen under a
# flood of 10 MB lines). Beyond either bound the oldest queued records are dropped, counted.
MAX_PENDING_BYTES = 16 << 20

_log = get_logger("file_sink")


def _default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def render_record(api: str, params: dict[str, Any], now: datetime) -> str:
    """One JSON line for one call."""
    record = {"time": now.isoformat(), "api": api, "params": params}
    return json.dumps(record, default=_default, ensure_ascii=False, separators=(",", ":")) + "\n"


class FileSink:
    """Appends call records to a JSON Lines file from a dedicated thread.

    Args:
        path: the file; parent directories are created.
        max_pending: records held while the writer is behind.
        max_bytes: bytes held while the writer is behind, counting those it is writing.
            A record larger than this alone is dropped (counted) rather than held.
    """

    def __init__(self, path: Path, max_pending: int = MAX_PENDING_RECORDS,
                 max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.path = path
        self._pending: deque[bytes] = deque()
        self._max = max_pending
        self._max_bytes = max_bytes
        self._held_bytes = 0  # queued + in the writer's hands: what the bound is about
        self._cond = threading.Condition()
        self._closing = False
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._writer, name="file-sink", daemon=True)
        self._thread.start()

    name = "file"

    def start(self) -> None:
        """The writer thread starts with the sink (records may come before `start`)."""

    async def stop(self, deadline: float) -> None:
        await self.aclose(max(0.5, deadline - time.monotonic()))

    def counters(self) -> dict[str, int]:
        return {"records_written": self.written, "records_dropped": self.dropped}

    def record(self, api: str, params: dict[str, Any]) -> None:
        """Queue one record; never blocks. Rendering happens here so params may change later.

        Beyond the bounds (records, or bytes held) the oldest queued records go first; a
        record that alone exceeds the byte bound is dropped. Drops are counted and logged
        (the first, then every 100th).
        """
        line = render_record(api, params, datetime.now(UTC)).encode("utf-8", "replace")
        size = len(line)
        dropped = 0
        with self._cond:
            if size > self._max_bytes:
                dropped = 1
            else:
                while self._pending and (len(self._pending) >= self._max
                                         or self._held_bytes + size > self._max_bytes):
                    self._held_bytes -= len(self._pending.popleft())
                    dropped += 1
                if self._held_bytes + size <= self._max_bytes:
                    self._pending.append(line)
                    self._held_bytes += size
                    self._cond.notify()
                else:  # the writer holds the rest of the bound: this one cannot wait
                    dropped += 1
            self.dropped += dropped
            total = self.dropped
        if dropped and first_or_every(total, step=dropped):
            _log.warning("file_sink_records_dropped", path=str(self.path), dropped=total,
                         reason="the writer is behind and the sink's memory bound is reached",
                         max_bytes=self._max_bytes)

    async def aclose(self, timeout: float) -> None:
        """Write what is queued, waiting at most `timeout` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, max(0.0, timeout))
        with self._cond:
            if self._pending:
                self.dropped += len(self._pending)
                _log.warning("file_sink_records_dropped", path=str(self.path),
                             count=len(self._pending), reason="not written before the deadline")
                self._held_bytes -= sum(len(line) for line in self._pending)
                self._pending.clear()

    def _writer(self) -> None:
        handle = None
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending and self._closing:
                    break
                lines = list(self._pending)
                self._pending.clear()
            size = sum(len(line) for line in lines)
            try:
                if handle is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    handle = self.path.open("ab")
                handle.writelines(lines)  # no joined copy: the bound is what is held
                handle.flush()
                self.written += len(lines)
            except OSError as exc:
                self.errors += 1
                with self._cond:
                    self.dropped += len(lines)
                if first_or_every(self.errors, 1000):
                    _log.error("file_sink_write_failed", path=str(self.path), error=str(exc),
                               errors=self.errors, dropped=self.dropped)
                handle = None
            finally:
                del lines
                with self._cond:
                    self._held_bytes -= size
        if handle is not None:
            handle.close()
