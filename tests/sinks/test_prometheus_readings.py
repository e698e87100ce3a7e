"""The instance readings on the Prometheus page: the CPU counters behind the rates."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sinks.prometheus import PrometheusSink
from agent.sources.system import CgroupReader, SystemSampler
from tests.sources.test_system import V2, FakeClock, tree


def test_cpu_seconds_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sagemaker_agent_cpu_seconds_total{view}` is the cumulative CPU time the reading was
    computed from (cgroup usage; /proc/stat busy), so rate() over any window is exact."""
    FakeClock(monkeypatch)
    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 0 500 90000 0 0 0 0 0 0\n")
    sampler = SystemSampler(CgroupReader(tree(tmp_path / "cg", V2), {"": "/"}), None,
                            proc_stat=stat)
    sink = PrometheusSink(None)
    sink.on_reading(sampler.sample(), [])
    page = sink.page().decode()
    tick = sampler.counters().host_busy_ns / 1500  # ns per clock tick
    assert 'sagemaker_agent_cpu_seconds_total{view="container"} 1.0\n' in page
    assert f'sagemaker_agent_cpu_seconds_total{{view="host"}} {1500 * tick / 1e9}\n' in page
