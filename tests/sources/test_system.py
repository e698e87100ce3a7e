"""System sampler: fake cgroup v1/v2 trees, then real load on this machine."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.rules import cgroup
from agent.sources.system import CgroupReader, SystemSampler


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


V2 = {
    "cgroup.controllers": "cpu memory cpuset",
    "cpu.stat": "usage_usec 1000000\nuser_usec 800000\nsystem_usec 200000\n"
                "nr_periods 50\nnr_throttled 7\nthrottled_usec 350000\n",
    "cpu.max": "150000 100000\n",
    "cpuset.cpus.effective": "0-3\n",
    "memory.current": str(600 << 20),
    "memory.max": str(1 << 30),
    "memory.stat": f"anon {400 << 20}\ninactive_file {88 << 20}\nactive_file 1000\n",
    "memory.events": "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
}
V1 = {
    "cpuacct/cpuacct.usage": "2000000000",
    "cpu/cpu.cfs_quota_us": "-1",
    "cpu/cpu.cfs_period_us": "100000",
    "cpu/cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 2500000000\n",
    "cpuset/cpuset.effective_cpus": "0,2\n",
    "memory/memory.usage_in_bytes": str(300 << 20),
    "memory/memory.limit_in_bytes": "9223372036854771712",
    "memory/memory.stat": f"cache 100\ntotal_inactive_file {44 << 20}\n",
    "memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
}


class TestCgroupRules:
    @pytest.mark.parametrize(("text", "cores"), [("max 100000", None), ("200000 100000", 2.0),
                                                  ("50000 100000\n", 0.5)])
    def test_cpu_max(self, text: str, cores: float | None) -> None:
        """cpu.max gives cores; `max` means no limit."""
        assert cgroup.parse_cpu_max(text) == cores

    @pytest.mark.parametrize(("text", "count"), [("0-3", 4), ("0,2,4-5", 4), ("7", 1), ("", None)])
    def test_cpuset(self, text: str, count: int | None) -> None:
        """cpuset lists count CPUs."""
        assert cgroup.parse_cpuset(text) == count

    def test_effective_cores_prefers_quota(self) -> None:
        """Quota, else cpuset, else host count."""
        assert cgroup.effective_cores(1.5, 4, 8) == 1.5
        assert cgroup.effective_cores(None, 4, 8) == 4
        assert cgroup.effective_cores(None, None, 8) == 8

    def test_unlimited_memory_is_host_total(self) -> None:
        """An unlimited cgroup is measured against the host's memory."""
        assert cgroup.memory_limit("max", 1000) == 1000
        assert cgroup.memory_limit("9223372036854771712", 1000) == 1000
        assert cgroup.memory_limit("500", 1000) == 500


class TestFakeTrees:
    def test_v2(self, tmp_path: Path) -> None:
        """cgroup v2: cores from cpu.max, working set, throttling, OOM kills, CPU rate."""
        root = tree(tmp_path, V2)
        sampler = SystemSampler(CgroupReader(root, {"": "/"}), tmp_path)
        sampler.sample()
        started = time.monotonic()
        time.sleep(0.2)
        (root / "cpu.stat").write_text(f"usage_usec {1000000 + int(0.3e6)}\n")
        reading = sampler.sample()
        wall = time.monotonic() - started
        assert reading.cores_container == 1.5
        assert reading.mem_container_used == (600 - 88) << 20
        assert reading.mem_container_limit == 1 << 30
        assert reading.mem_container_pct == pytest.approx(512 / 1024 * 100)
        assert reading.oom_kills == 2
        assert reading.cpu_container_pct == pytest.approx(0.3 / wall * 100, rel=0.1)
        first = SystemSampler(CgroupReader(tree(tmp_path / "again", V2), {"": "/"}), tmp_path)
        assert first.sample().throttled_periods == 7
        assert first.sample().throttled_seconds == pytest.approx(0.35)

    def test_v1(self, tmp_path: Path) -> None:
        """cgroup v1: cpuacct usage, cpuset cores, unlimited memory -> host total."""
        root = tree(tmp_path, V1)
        reader = CgroupReader(root, {})
        assert reader.version == 1
        reading = SystemSampler(reader, tmp_path).sample()
        assert reading.cores_container == 2
        assert reading.mem_container_used == (300 - 44) << 20
        assert reading.mem_container_limit == reading.mem_host_total
        assert reading.throttled_periods == 4 and reading.throttled_seconds == 2.5
        assert reading.oom_kills == 1

    def test_nested_own_path(self, tmp_path: Path) -> None:
        """The process's own cgroup (from /proc/self/cgroup) is read when it is visible."""
        tree(tmp_path, {"cgroup.controllers": "cpu", **{f"kubepods/pod1/{k}": v for k, v in V2.items()}})
        reader = CgroupReader(tmp_path, {"": "/kubepods/pod1"})
        assert reader.cpu_quota() == 1.5

    def test_missing_files_degrade_to_host(self, tmp_path: Path) -> None:
        """An empty tree gives host figures, never an exception."""
        (tmp_path / "cgroup.controllers").write_text("")
        sampler = SystemSampler(CgroupReader(tmp_path, {"": "/"}), None)
        sampler.sample()
        reading = sampler.sample()
        assert reading.mem_container_used == reading.mem_host_used
        assert reading.cpu_container_pct == reading.cpu_host_pct
        assert reading.disk_pct is None and reading.oom_kills is None


BURN = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass\n"


class TestRealLoad:
    def _cpu_over(self, seconds: float, procs: int) -> float:
        sampler = SystemSampler(CgroupReader(), Path("/"))
        children = [subprocess.Popen([sys.executable, "-c", BURN.format(s=seconds + 2)])
                    for _ in range(procs)]
        try:
            time.sleep(1.0)  # let them start
            sampler.sample()
            time.sleep(seconds)
            return sampler.sample().cpu_container_pct or 0.0
        finally:
            for child in children:
                child.kill()
                child.wait()

    def test_one_busy_core_is_about_100(self) -> None:
        """A child burning one core reads 100 ± 20 over a fully covered window."""
        assert 80 <= self._cpu_over(4, 1) <= 120

    def test_two_busy_processes_about_200(self) -> None:
        """Two busy processes read about 200 on a machine with ≥ 2 cores."""
        assert 160 <= self._cpu_over(4, 2) <= 220

    def test_idle_is_near_zero(self) -> None:
        """With nothing running the figure falls near 0."""
        sampler = SystemSampler(CgroupReader(), Path("/"))
        sampler.sample()
        time.sleep(2)
        assert (sampler.sample().cpu_container_pct or 0.0) < 30

    def test_memory_follows_1gib_allocation(self) -> None:
        """Allocating and touching 1 GiB raises used memory by ≥ 80 % of the step."""
        sampler = SystemSampler(CgroupReader(), Path("/"))
        before = sampler.sample()
        child = subprocess.Popen([sys.executable, "-c", "import sys, time\nb = bytearray(1 << 30)\n"
                                  "for i in range(0, len(b), 4096): b[i] = 1\n"
                                  "print('ready', flush=True)\ntime.sleep(30)\n"],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            after = sampler.sample()
        finally:
            child.kill()
            child.wait()
        step = after.mem_container_pct - before.mem_container_pct
        expected = (1 << 30) / after.mem_container_limit * 100
        assert step >= 0.8 * expected

    def test_disk_matches_df(self) -> None:
        """DiskUtilization matches `df`'s Use% within 1 point."""
        reading = SystemSampler(CgroupReader(), Path("/")).sample()
        df = subprocess.run(["df", "-P", "/"], capture_output=True, text=True, check=True).stdout
        use = int(re.findall(r"(\d+)%", df)[-1])
        assert reading.disk_pct is not None and abs(reading.disk_pct - use) <= 1
