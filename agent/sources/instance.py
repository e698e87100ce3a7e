"""The instance source: samples the system (cgroup, /proc) and the GPUs once a second."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

from agent.log import first_or_every, get_logger
from agent.model import GpuReading, SystemReading
from agent.rules.instance_metrics import next_tick
from agent.sources.gpu import GpuSampler
from agent.sources.system import SystemSampler
from agent.tasks import supervise

OnReading = Callable[[SystemReading, Sequence[GpuReading]], None]
_log = get_logger("instance")

# The loop wakes this much before a tick; the sampling thread waits out the rest with
# time.sleep, so a busy event loop does not delay the reading at an interval boundary.
WAKE_EARLY_S = 0.05
# How long a shutdown waits for NVML still starting (a driver may take seconds).
GPU_START_WAIT_S = 3.0


class InstanceSampler:
    """Reads the system and GPUs every `interval` seconds, off the event loop, and hands
    each reading to every consumer (aggregation, the Prometheus view).

    Samples fall on the wall clock's multiples of `interval`, and on every multiple of
    `boundary` (the publish interval), so a reading of the CPU counters lies on each
    interval's boundary (within a few ms) and the interval's CPU figure is exact.

    A failed sample is counted and logged (first and every 100th), never raised:
    a sampler must never stop the agent.
    """

    name = "instance"

    def __init__(self, system: SystemSampler, consumers: Sequence[OnReading], *,
                 interval: float, gpu: GpuSampler | None = None,
                 boundary: float | None = None) -> None:
        self.system = system
        self.gpu = gpu
        self._consumers = tuple(consumers)
        self._interval = interval
        self._boundary = boundary
        self.samples = 0
        self.errors = 0
        self.late = 0
        self._task: asyncio.Task[None] | None = None
        # One reading at a time (a cancelled tick's thread may still be reading), and a way
        # to wake a thread waiting for its tick when the agent stops.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._gpu_init: asyncio.Future[GpuSampler] | None = None

    async def start(self) -> None:
        """A first reading now, kept only as the CPU counters' baseline (so every later
        reading has a rate, however short the run), then one on every tick."""
        await self.sample_once(deliver=False)
        self._task = supervise(self.name, self.run)

    async def stop(self, deadline: float) -> None:
        """Stop sampling and take one last sample (the final interval's end), by `deadline`."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._gpu_init is not None and self.gpu is None:
            # NVML's start-up runs on a thread that cancelling `run` cannot stop: let it
            # finish (and log) before `agent_stopped`, and read its GPUs in the last sample;
            # briefly: a hung driver must not take the time the sinks need to flush.
            left = max(0.0, deadline - time.monotonic())
            await asyncio.wait([self._gpu_init], timeout=min(GPU_START_WAIT_S, left / 4))
            if self._gpu_init.done() and not self._gpu_init.exception():
                self.gpu = self._gpu_init.result()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.sample_once()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Sample on every tick until cancelled."""
        if self.gpu is None:
            self._gpu_init = asyncio.ensure_future(asyncio.to_thread(GpuSampler))
            # Its outcome is read here or by `stop`; a failure nobody waited for is not a
            # "never retrieved" warning (the supervisor sees it through `run`).
            self._gpu_init.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.gpu = await asyncio.shield(self._gpu_init)
        while True:
            tick = next_tick(time.time(), self._interval, self._boundary)
            await asyncio.sleep(max(0.0, tick - time.time() - WAKE_EARLY_S))
            await self.sample_once(tick)

    async def sample_once(self, at: float | None = None, *, deliver: bool = True) -> None:
        """One sample of everything, at Unix time `at` (now when None), handed to every
        consumer unless `deliver` is false."""
        try:
            system, gpus = await asyncio.to_thread(self._sample, at)
        except Exception as exc:  # noqa: BLE001 - a sampler must never stop the agent
            self.errors += 1
            if first_or_every(self.errors):
                _log.error("sample_failed", error=repr(exc), errors=self.errors)
            return
        self.samples += 1
        if deliver:
            for consume in self._consumers:
                consume(system, gpus)

    def _sample(self, at: float | None) -> tuple[SystemReading, list[GpuReading]]:
        """In a worker thread: wait for the tick, read the CPU counters first, then the rest."""
        if at is not None:
            wait = at - time.time()
            if wait > 0:
                self._stopping.wait(wait)
            elif wait < -0.1 * self._interval:
                self.late += 1  # counted: the interval figures interpolate around it
        with self._lock:
            system = self.system.sample()
            gpus = self.gpu.sample() if self.gpu else []
        return system, gpus

    def counters(self) -> dict[str, int]:
        out = {"samples": self.samples, "sampler_errors": self.errors,
               "samples_off_tick": self.late}
        if self.gpu is not None:
            out.update(self.gpu.counters())
        return out
