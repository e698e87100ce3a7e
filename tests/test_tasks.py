"""The background tasks `agent.app` starts run under `agent.tasks.supervise`: a fault in a
consumer costs a logged, counted restart, and the source goes on.

Real sources: the instance sampler reading this machine's /proc and cgroup, and the
child-output framing fed by a real pipe through its relay thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.model import GpuReading, LogEvent, SystemReading
from agent.sources.child_output import ChildOutputSource, Intake
from agent.sources.instance import InstanceSampler
from agent.sources.system import CgroupReader, SystemSampler
from agent.stdio import StdioWriter
from agent.tasks import FAILURES

pytestmark = pytest.mark.timeout(60)


def test_instance_sampler_survives_a_consumer_that_raises() -> None:
    """The first reading's consumer raises: the sampler is restarted and readings go on.
    Before, its task died on the first exception and sampling stopped for good."""
    readings: list[float] = []
    more = asyncio.Event()

    def consume(system: SystemReading, gpus: Sequence[GpuReading]) -> None:
        readings.append(system.timestamp)
        if len(readings) == 1:
            raise ZeroDivisionError("a consumer's bug")
        if len(readings) >= 3:
            more.set()

    async def main() -> None:
        sampler = InstanceSampler(SystemSampler(CgroupReader(), Path("/")), [consume],
                                  interval=0.05)
        await sampler.start()
        try:
            await asyncio.wait_for(more.wait(), timeout=20)
        finally:
            await sampler.stop(0.0)

    before = FAILURES.by_task["instance"]
    asyncio.run(main())
    assert len(readings) >= 3
    assert FAILURES.by_task["instance"] - before == 1


def test_child_output_framing_survives_an_emit_that_raises(tmp_path: Path) -> None:
    """The first batch of events cannot be emitted (the callback raises): framing restarts
    and the lines written after it still arrive, and the pipe's EOF still ends the source.
    Before, the framing task died and every later line was lost."""
    emitted: list[str] = []
    calls = 0
    read_fd, write_fd = os.pipe()
    sink = os.open(tmp_path / "relayed", os.O_WRONLY | os.O_CREAT)

    def emit(events: Sequence[LogEvent]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the sink's intake broke once")
        emitted.extend(e.message for e in events)

    async def main() -> None:
        # A short idle flush: the single line is emitted after 0.1 s of quiet, not 5 s.
        source = ChildOutputSource(Intake(asyncio.get_running_loop()), streams=("stdout",),
                                   idle_flush_s=0.1, emit=emit)
        source.follow(read_fd, "stdout", StdioWriter(sink))
        await source.start()
        os.write(write_fd, b"lost with the failed emit\n")
        while calls < 1:
            await asyncio.sleep(0.01)
        os.write(write_fd, b"after the restart\n")
        os.close(write_fd)
        await asyncio.wait_for(source.finished.wait(), timeout=20)
        await source.stop(0.0)

    before = FAILURES.by_task["child_output"]
    try:
        asyncio.run(main())
    finally:
        os.close(sink)
    assert emitted == ["after the restart"]
    assert FAILURES.by_task["child_output"] - before == 1
