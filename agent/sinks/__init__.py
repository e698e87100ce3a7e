"""Sinks: where telemetry goes. They never import sources.

A sink takes `agent.model` values (closed intervals, log events, readings)
through its own intake method and delivers them on its own schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    """What `agent.app` needs of every sink.

    `start` begins delivering; `stop` flushes what is queued by `deadline`
    (time.monotonic()) and keeps or counts the rest; `counters` are its
    self-telemetry, flat and named for the last log line and the Prometheus page.
    """

    name: str

    def start(self) -> None: ...

    async def stop(self, deadline: float) -> None: ...

    def counters(self) -> Mapping[str, int]: ...
