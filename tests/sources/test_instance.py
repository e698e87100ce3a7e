"""The instance sampler's schedule: readings on the wall clock's ticks and on every boundary."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from agent.model import GpuReading, SystemReading
from agent.sources.instance import InstanceSampler
from agent.sources.system import CgroupReader, SystemSampler


def offsets(step: float, boundary: float | None, count: int) -> tuple[list[float], list[float]]:
    """Run a real sampler until `count` readings; each reading's distance from the nearest
    multiple of `step` (seconds), and the reading times."""
    times: list[float] = []
    done = asyncio.Event()

    def consume(system: SystemReading, gpus: Sequence[GpuReading]) -> None:
        times.append(system.timestamp)
        if len(times) >= count:
            done.set()

    async def main() -> None:
        # No NVML on a test machine: the sampler's GPU part finds none and reads nothing.
        sampler = InstanceSampler(SystemSampler(CgroupReader(), Path("/")), [consume],
                                  interval=step, boundary=boundary)
        await sampler.start()
        try:
            await asyncio.wait_for(done.wait(), timeout=30)
        finally:
            await sampler.stop(0.0)

    asyncio.run(main())
    return [abs(t - round(t / step) * step) for t in times[:count]], times[:count]


def test_readings_fall_on_wall_clock_ticks() -> None:
    """At a 0.25 s step the CPU counters are read on the quarter seconds (a few ms after, the
    thread's wake-up), so every interval boundary has a reading on it; a sampler that sleeps
    a step after each reading drifts over the whole step instead."""
    distances, times = offsets(0.25, 1, 8)
    assert statistics.median(distances) < 0.005, distances
    assert max(distances) < 0.05, distances
    steps = [b - a for a, b in zip(times, times[1:])]
    assert all(0.2 < s < 0.3 for s in steps), steps


def test_a_run_shorter_than_a_tick_still_has_a_cpu_figure() -> None:
    """Stopped while the first tick's reading still waits for its moment: the last reading
    has a CPU rate all the same (a 0.5 s run used to publish no CPUUtilization at all, about
    one time in four)."""
    readings: list[SystemReading] = []

    async def main() -> None:
        sampler = InstanceSampler(SystemSampler(CgroupReader(), Path("/")),
                                  [lambda system, _: readings.append(system)],
                                  interval=30.0, boundary=60.0)
        await sampler.start()
        await asyncio.sleep(0)  # the tick's thread is waiting for its moment
        await asyncio.wait_for(sampler.stop(time.monotonic() + 5), timeout=5)

    asyncio.run(main())
    assert readings and readings[-1].cpu_host_pct is not None
