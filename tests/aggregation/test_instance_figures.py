"""Exact interval CPU through the real SystemSampler (fake cgroup v2 tree, fake /proc/stat),
InstanceFigures and Aggregator, on a clock that moves only when told.

The load steps at the readings, so the counters are linear between readings and the truth
over any window is known exactly. Readings are taken half a second off the boundaries (as an
unaligned sampler would), where an Average of the per-second samples is 10 points off.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from agent.aggregation import instance as instance_module
from agent.aggregation.aggregator import Aggregator
from agent.aggregation.instance import InstanceFigures
from agent.model import ClosedInterval, Identity, MetricKey, Resource, Statistic
from agent.sources.system import CgroupReader, SystemSampler
from tests.sources.test_system import V2, FakeClock, tree

IDENTITY = Identity(Resource.ENDPOINT, "ep", "AllTraffic", "model", "", "i-1", 0)
START = 1_700_001_005  # an interval start (multiple of 5) a little after FakeClock's origin
# Busy cores of the container in the window ending at reading k (readings at START - 0.5 + k);
# the host is one core busier.
RATES = {1: 2.0, 2: 2.0, 3: 0.0, 4: 0.0, 5: 1.0, 6: 1.0}


class Scenario:
    """A v2 tree whose usage follows RATES, sampled at START - 0.5 + k."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tree(tmp_path / "cg", {**V2, "cpu.max": "200000 100000\n"})
        self.proc_stat = tmp_path / "stat"
        self.clock = FakeClock(monkeypatch)
        monkeypatch.setattr(instance_module, "time", self.clock)
        self.clock.advance(START - 0.5 - self.clock.time())
        self.usage_us, self.host_ticks, self.k = 1_000_000.0, 50_000.0, 0
        self._write()
        self.sampler = SystemSampler(CgroupReader(self.root, {"": "/"}), None,
                                     proc_stat=self.proc_stat)
        self.aggregator = Aggregator(5)
        self.aggregator.close(self.clock.time())
        self.figures = InstanceFigures(self.aggregator, IDENTITY, "SM",
                                       read_counters=self.sampler.counters)

    def _write(self) -> None:
        (self.root / "cpu.stat").write_text(f"usage_usec {int(round(self.usage_us))}\n")
        self.proc_stat.write_text(f"cpu  {int(round(self.host_ticks))} 0 0 99999 0 0 0 0 0 0\n")

    def run_to(self, seconds: float, rate: float) -> None:
        """Let `seconds` pass with `rate` container cores busy (one more on the host)."""
        self.clock.advance(seconds)
        self.usage_us += rate * seconds * 1e6
        self.host_ticks += (rate + 1) * seconds * 100
        self._write()

    def reading(self) -> None:
        self.figures.on_reading(self.sampler.sample(), [])

    def readings(self, last: int) -> None:
        """Readings 0..last, each after its window of RATES."""
        self.reading()
        for k in range(1, last + 1):
            self.run_to(1.0, RATES[k])
            self.reading()

    def close(self, *, force: bool = False) -> ClosedInterval:
        self.figures.flush()
        closed = self.aggregator.close(self.clock.time(), force=force)
        return next(c for c in closed if c.start == START)


def cpu(closed: ClosedInterval, metric: str, view: str) -> Statistic:
    dims = "ContainerName" if view == "container" else "Host"
    return next(s for k, s in closed.stats.items()
                if k.name == metric and dims in {n for n, _ in k.dimensions})


def check(stat: Statistic, count: int, average: float, low: float, high: float) -> None:
    assert stat.count == count
    assert stat.total / stat.count == pytest.approx(average)
    assert (stat.minimum, stat.maximum) == pytest.approx((low, high))


def test_interval_average_from_boundary_counters(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """[START, START+5): the container used 1 + 2 + 0 + 0 + 1 + 0.5 = 4.5 core-seconds, so the
    Average is 90 (the per-second samples average 100); SampleCount is the 5 samples whose
    window's middle lies in the interval, Sum = 90 x 5, Min/Max theirs; normalized over the
    2-core quota (container) and the host's cores."""
    s = Scenario(tmp_path, monkeypatch)
    s.readings(6)
    s.clock.advance(0.1)
    closed = s.close()
    host_cores = psutil.cpu_count()
    check(cpu(closed, "CPUUtilization", "container"), 5, 90.0, 0.0, 200.0)
    check(cpu(closed, "CPUUtilizationNormalized", "container"), 5, 45.0, 0.0, 100.0)
    check(cpu(closed, "CPUUtilization", "host"), 5, 190.0, 100.0, 300.0)
    check(cpu(closed, "CPUUtilizationNormalized", "host"), 5, 190.0 / host_cores,
          min(100.0, 100.0 / host_cores), min(100.0, 300.0 / host_cores))
    assert any(k.name == "MemoryUtilization" for k in closed.stats)
    assert s.figures.counters()["cpu_boundary_reads"] == 0  # the readings straddled it


def test_boundary_read_when_its_reading_is_late(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The interval closes 10 ms after its end, before the sampler's boundary reading: the
    counters are read then, and the Average is still exact (90). The reading that arrives
    after the close is counted late, and the closed figure does not change."""
    s = Scenario(tmp_path, monkeypatch)
    s.readings(5)
    s.run_to(0.51, RATES[6])
    closed = s.close()
    check(cpu(closed, "CPUUtilization", "container"), 5, 90.0, 0.0, 200.0)
    assert s.figures.counters()["cpu_boundary_reads"] == 1
    s.run_to(0.01, RATES[6])
    s.reading()  # window [START+4.5, START+5.02]: its middle is in the closed interval
    assert s.figures.counters()["cpu_samples_late"] == 4  # 2 metrics x 2 views


def test_final_interval_at_shutdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced close (shutdown) publishes the open interval up to the last reading:
    START .. START+2.5 holds 1 + 2 + 0 = 3 core-seconds, 120 % over 2.5 s."""
    s = Scenario(tmp_path, monkeypatch)
    s.readings(3)
    s.clock.advance(0.1)
    closed = s.close(force=True)
    check(cpu(closed, "CPUUtilization", "container"), 3, 120.0, 0.0, 200.0)


def test_put_replaces_and_refuses_published_intervals() -> None:
    """`Aggregator.put` sets a whole statistic (the second put replaces the first); an interval
    already published takes nothing and the refusal is counted late."""
    aggregator = Aggregator(5)
    aggregator.close(1000.0)
    key = MetricKey("SM/Endpoints", "CPUUtilization", (("Host", "ep/AllTraffic/i-1"),), "Percent")
    assert aggregator.put(1000, key, Statistic(1.0, 50.0, 50.0, 50.0))
    assert aggregator.put(1000, key, Statistic(2.0, 80.0, 30.0, 50.0))
    [closed] = aggregator.close(1005.0)
    assert closed.stats[key] == Statistic(2.0, 80.0, 30.0, 50.0)
    assert not aggregator.put(1000, key, Statistic(1.0, 1.0, 1.0, 1.0))
    assert aggregator.late == 1



def test_reading_after_its_interval_was_published_still_gives_a_cpu_figure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded machine: the interval closes before any reading with a rate arrived, then the
    one reading of a short run comes in, its window's middle in the published interval. It is
    counted late and counts in the open interval, so the run still has its CPU figure (it
    used to be put into the published interval and refused: no CPUUtilization at all)."""
    s = Scenario(tmp_path, monkeypatch)
    s.reading()  # the baseline, at START - 0.5: no rate yet
    s.run_to(5.6, 1.0)  # to START + 5.1
    s.figures.flush()
    s.aggregator.close(s.clock.time())  # [START, START+5) published, without CPU
    s.reading()  # window [START - 0.5, START + 5.1]: its middle is in the published interval
    s.clock.advance(0.1)
    s.figures.flush()
    final = [c for c in s.aggregator.close(s.clock.time(), force=True) if c.start == START + 5]
    assert final and any(k.name == "CPUUtilization" for k in final[0].stats)
    assert s.figures.counters()["cpu_samples_late"] == 4  # 2 metrics x 2 views
    assert s.aggregator.late == 0
