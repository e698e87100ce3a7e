"""The file sink: one JSON line per AWS call the agent makes, or would make in a dry run.

Format (DESIGN.md §3): `{"time": ISO-8601, "api": "PutLogEvents", "params": {...}}`,
where `params` are exactly the keyword arguments given to boto3, datetimes as
ISO-8601 strings. Writing happens in a worker thread fed by a bounded queue, so
a slow or blocked file (a full disk, a FIFO nobody reads) never stalls the
pipeline: records beyond the bound are dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from agent.log import get_logger

MAX_PENDING_RECORDS = 10_000

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
    """

    def __init__(self, path: Path, max_pending: int = MAX_PENDING_RECORDS) -> None:
        self.path = path
        self._pending: deque[str] = deque()
        self._max = max_pending
        self._cond = threading.Condition()
        self._closing = False
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._writer, name="file-sink", daemon=True)
        self._thread.start()

    def record(self, api: str, params: dict[str, Any]) -> None:
        """Queue one record; never blocks. Rendering happens here so params may change later."""
        line = render_record(api, params, datetime.now(UTC))
        with self._cond:
            if len(self._pending) >= self._max:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(line)
            self._cond.notify()

    async def aclose(self, timeout: float) -> None:
        """Write what is queued, waiting at most `timeout` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, max(0.0, timeout))
        with self._cond:
            if self._pending:
                self.dropped += len(self._pending)
                _log.warning("file_sink_records_dropped", path=str(self.path), count=len(self._pending))
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
            try:
                if handle is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    handle = self.path.open("a", encoding="utf-8")
                handle.write("".join(lines))
                handle.flush()
                self.written += len(lines)
            except OSError as exc:
                self.errors += 1
                self.dropped += len(lines)
                if self.errors == 1 or self.errors % 1000 == 0:
                    _log.error("file_sink_write_failed", path=str(self.path), error=str(exc),
                               errors=self.errors, dropped=self.dropped)
                handle = None
        if handle is not None:
            handle.close()
