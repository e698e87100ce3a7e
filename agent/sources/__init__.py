"""Sources: where telemetry comes from. They emit values; they never import sinks.

Each source hands what it measures to callbacks given by `agent.app` (records,
samples, readings, log events: the types in `agent.model`), so a source knows
nothing of aggregation or delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable


@runtime_checkable
class Source(Protocol):
    """What `agent.app` needs of every source.

    `start` begins producing (opens listeners, starts tasks) and raises OSError
    when it cannot; `stop` ends it by `deadline` (time.monotonic()), handing on
    what is already in hand; `counters` are its self-telemetry, flat and named
    for the last log line and the Prometheus page.
    """

    name: str

    async def start(self) -> None: ...

    async def stop(self, deadline: float) -> None: ...

    def counters(self) -> Mapping[str, int]: ...
