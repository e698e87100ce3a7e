"""The publisher: every closed interval is handed on, also across a start or a restart."""

from __future__ import annotations

import asyncio
import time

from agent.aggregation.aggregator import Aggregator
from agent.aggregation.publisher import Publisher
from agent.model import ClosedInterval, MetricKey

KEY = MetricKey("NS", "Figure", (("Host", "h"),), "None")


def test_figures_of_an_interval_that_ended_before_the_start_are_published() -> None:
    """A run (the first, or one restarted after a crash) must not swallow what already ended."""

    async def scenario() -> list[ClosedInterval]:
        aggregator = Aggregator(1)
        aggregator.add(KEY, 7.0, time.time() - 2)  # an interval that has ended
        got: list[ClosedInterval] = []
        submitted = asyncio.Event()

        def submit(closed: list[ClosedInterval]) -> None:
            got.extend(closed)
            if any(KEY in c.stats for c in closed):
                submitted.set()

        task = asyncio.create_task(Publisher(aggregator, submit).run())
        try:
            await asyncio.wait_for(submitted.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return got

    closed = asyncio.run(scenario())
    stat = next(c.stats[KEY] for c in closed if KEY in c.stats)
    assert (stat.count, stat.total) == (1, 7.0)
