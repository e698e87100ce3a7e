"""Instance-metric rules: normalized figures, sampling ticks, counters over a window."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.rules.instance_metrics import (
    counter_at,
    instance_figures,
    interval_rate,
    next_tick,
    normalized,
)


@dataclass
class System:
    cpu_container_pct: float | None
    cpu_host_pct: float | None
    cores_container: float
    cores_host: int
    mem_container_pct: float = 10.0
    mem_host_pct: float = 20.0
    disk_pct: float | None = None


@dataclass
class Gpu:
    utilization_pct: float | None
    memory_pct: float


def figures(system: System | None, gpus: list[Gpu], view: str = "host") -> dict[str, float]:
    return {f.metric: f.value for f in instance_figures(system, gpus) if f.view == view}


class TestNormalized:
    def test_cpu_normalized_is_scaled_over_cores(self) -> None:
        """CPUUtilizationNormalized = CPUUtilization / cores of the view: 1.5 busy cores of a
        1.5-core quota is 100; 2 busy cores of a 4-core host is 50."""
        system = System(cpu_container_pct=150.0, cpu_host_pct=200.0, cores_container=1.5,
                        cores_host=4)
        assert figures(system, [], "container")["CPUUtilizationNormalized"] == 100.0
        host = figures(system, [])
        assert host["CPUUtilization"] == 200.0 and host["CPUUtilizationNormalized"] == 50.0

    def test_capped_at_100(self) -> None:
        """A quota overrun (CFS burst) or a window a few ms off never reads over 100."""
        assert normalized(210.0, 2.0) == 100.0
        assert normalized(50.0, 0.0) == 0.0

    def test_gpu_normalized_over_gpus(self) -> None:
        """Four GPUs at 100, 50, 50, 0: GPUUtilization 200, normalized 50; memory likewise."""
        gpus = [Gpu(100.0, 80.0), Gpu(50.0, 40.0), Gpu(50.0, 40.0), Gpu(0.0, 0.0)]
        assert figures(None, gpus) == {"GPUUtilization": 200.0, "GPUUtilizationNormalized": 50.0,
                                       "GPUMemoryUtilization": 160.0,
                                       "GPUMemoryUtilizationNormalized": 40.0}

    def test_gpu_without_utilization(self) -> None:
        """Devices without utilization (MIG) leave GPUUtilization out, not zero, and are not
        counted in its normalization; their memory still counts."""
        assert figures(None, [Gpu(None, 50.0), Gpu(None, 30.0)]) == {
            "GPUMemoryUtilization": 80.0, "GPUMemoryUtilizationNormalized": 40.0}
        mixed = figures(None, [Gpu(None, 50.0), Gpu(60.0, 30.0)])
        assert mixed["GPUUtilization"] == 60.0 and mixed["GPUUtilizationNormalized"] == 60.0


class TestTicks:
    @pytest.mark.parametrize(("now", "step", "boundary", "tick"), [
        (100.3, 1.0, None, 101.0),
        (100.0, 1.0, None, 101.0),          # on a tick: the next one
        (100.3, 0.25, 5, 100.5),
        (104.95, 0.3, 5, 105.0),            # the boundary comes before the next 0.3 multiple
        (101.0, 7.0, 60, 105.0),
        (118.0, 7.0, 60, 119.0),
    ])
    def test_next_tick(self, now: float, step: float, boundary: int | None, tick: float) -> None:
        """Ticks fall on the wall clock's multiples of the step, and on every boundary."""
        assert next_tick(now, step, boundary) == pytest.approx(tick)


class TestCounters:
    POINTS = [(10.0, 0.0), (11.0, 2e9), (12.0, 2e9), (13.0, 3e9)]  # ns of CPU time

    def test_counter_at_interpolates(self) -> None:
        """Between two readings the counter is taken as linear; outside them, unknown."""
        assert counter_at(self.POINTS, 10.5) == 1e9
        assert counter_at(self.POINTS, 12.0) == 2e9
        assert counter_at(self.POINTS, 13.0) == 3e9
        assert counter_at(self.POINTS, 9.9) is None and counter_at(self.POINTS, 13.1) is None

    def test_interval_rate(self) -> None:
        """[10.5, 12.5): 1.5 s of CPU time over 2 s = 75 % of a core."""
        rate = interval_rate(self.POINTS, 10.5, 12.5)
        assert rate is not None and rate.percent == pytest.approx(75.0)

    def test_interval_rate_clipped_to_readings(self) -> None:
        """An interval the agent started in is measured from its first reading."""
        rate = interval_rate(self.POINTS, 5.0, 11.0)
        assert rate == (200.0, 10.0, 11.0)
        assert interval_rate(self.POINTS, 20.0, 25.0) is None
        assert interval_rate(self.POINTS[:1], 5.0, 15.0) is None
