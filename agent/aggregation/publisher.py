"""Closes each interval on time and hands it on: the one clock of the aggregation stage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from agent.aggregation.aggregator import Aggregator
from agent.model import ClosedInterval


class Publisher:
    """Every `interval` seconds (plus `jitter`, which spreads a fleet's calls), flush the
    pre-tallied parts into the aggregator, close the intervals that ended and submit them.

    Args:
        aggregator: the intervals.
        submit: where closed intervals go (the CloudWatch metrics sink).
        before_close: called first each time (`RequestMetrics.flush`).
        jitter: seconds after the boundary to publish.
    """

    def __init__(self, aggregator: Aggregator, submit: Callable[[list[ClosedInterval]], object],
                 *, before_close: Sequence[Callable[[], None]] = (), jitter: float = 0.0) -> None:
        self.aggregator = aggregator
        self._submit = submit
        self._before = tuple(before_close)
        self._jitter = jitter
        self.published = 0

    async def run(self) -> None:
        """Publish each interval when it closes, until cancelled. A (re)start first publishes
        whatever ended before it: figures recorded before the first start, or intervals that
        closed while a crashed run waited to be restarted."""
        self.publish(time.time() - self._jitter)
        while True:
            due = self.aggregator.next_close_at(time.time()) + self._jitter
            await asyncio.sleep(max(0.0, due - time.time()))
            self.publish(time.time() - self._jitter)

    def publish(self, now: float, *, force: bool = False) -> None:
        """Close what ended by `now` (everything with `force`, at shutdown) and submit it."""
        for flush in self._before:
            flush()
        closed = self.aggregator.close(now, force=force)
        if closed:
            self.published += len(closed)
            self._submit(closed)

    def counters(self) -> dict[str, int]:
        return {"intervals_published": self.published, **self.aggregator.counters()}
