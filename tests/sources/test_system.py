"""System sampler: fake cgroup v1/v2 trees, then real load on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from agent.model import SystemReading
from agent.rules import cgroup
from agent.sources import system
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


class FakeClock:
    """Stands in for the sampler's `time` module: monotonic time moves only when told, so
    rates over fake cgroup trees are exact instead of depending on how long a sleep took."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._ns = 1_000_000_000_000
        monkeypatch.setattr(system, "time", self)

    def advance(self, seconds: float) -> None:
        self._ns += int(seconds * 1e9)

    def monotonic_ns(self) -> int:
        return self._ns

    def time(self) -> float:
        return 1.7e9 + self._ns / 1e9


class TestFakeTrees:
    def test_v2(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """cgroup v2: cores from cpu.max, working set, throttling, OOM kills, CPU rate."""
        root = tree(tmp_path, V2)
        clock = FakeClock(monkeypatch)
        sampler = SystemSampler(CgroupReader(root, {"": "/"}), tmp_path)
        sampler.sample()
        clock.advance(0.2)
        (root / "cpu.stat").write_text(f"usage_usec {1000000 + int(0.3e6)}\n")
        reading = sampler.sample()
        assert reading.cores_container == 1.5
        assert reading.mem_container_used == (600 - 88) << 20
        assert reading.mem_container_limit == 1 << 30
        assert reading.mem_container_pct == pytest.approx(512 / 1024 * 100)
        assert reading.oom_kills == 2
        assert reading.cpu_container_pct == pytest.approx(0.3 / 0.2 * 100)  # 1.5 cores busy
        first = SystemSampler(CgroupReader(tree(tmp_path / "again", V2), {"": "/"}), tmp_path)
        assert first.sample().throttled_periods == 7
        assert first.sample().throttled_seconds == pytest.approx(0.35)

    def test_v1(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """cgroup v1: cpuacct usage rate, cpuset cores, unlimited memory -> host total."""
        root = tree(tmp_path, V1)
        reader = CgroupReader(root, {})
        assert reader.version == 1
        clock = FakeClock(monkeypatch)
        sampler = SystemSampler(reader, tmp_path)
        assert sampler.sample().cpu_container_pct is None  # a rate needs two readings
        clock.advance(0.25)
        (root / "cpuacct/cpuacct.usage").write_text(str(2_000_000_000 + 500_000_000))
        reading = sampler.sample()
        assert reading.cpu_container_pct == pytest.approx(0.5 / 0.25 * 100)  # 2 cores busy
        assert reading.cores_container == 2
        assert reading.mem_container_used == (300 - 44) << 20
        assert reading.mem_container_limit == reading.mem_host_total
        assert reading.throttled_periods == 4 and reading.throttled_seconds == 2.5
        assert reading.oom_kills == 1

    def test_counters_carried_with_the_reading(self, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        """cgroup v2: each reading carries the cumulative counters its rates come from (cgroup
        usage in ns, /proc/stat busy ticks in ns), read at its timestamp, and the window the
        rates cover; `counters()` reads the same counters alone."""
        root = tree(tmp_path, V2)
        stat = tmp_path / "stat"
        stat.write_text("cpu  100 20 30 5000 7 1 2 3 40 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
        clock = FakeClock(monkeypatch)
        sampler = SystemSampler(CgroupReader(root, {"": "/"}), None, proc_stat=stat)
        first = sampler.sample()
        tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
        assert first.counters == (clock.time(), 1_000_000_000, (100 + 20 + 30 + 1 + 2 + 3) * tick_ns)
        assert first.timestamp == clock.time() and first.window_s is None
        clock.advance(0.5)
        (root / "cpu.stat").write_text("usage_usec 1250000\n")
        stat.write_text("cpu  150 20 30 5050 7 1 2 3 40 0\n")
        second = sampler.sample()
        assert second.window_s == pytest.approx(0.5)
        assert second.cpu_container_pct == pytest.approx(50.0)  # 0.25 s over 0.5 s
        assert second.cpu_host_pct == pytest.approx(50 * tick_ns / 0.5e9 * 100)
        assert sampler.counters() == second.counters

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


# Real load on this machine. Other processes share it (CI runs beside other jobs, and the
# container view rightly counts everything in the container), so no figure can be held to a
# fixed band. Instead each test reads the kernel's own counters -- this process's cgroup
# (cpu.stat usage_usec on v2, cpuacct.usage on v1) and /proc/stat -- just before and just after
# each of the sampler's two readings. The sampler's window lies between the inner and the outer
# pair of reads, so its figure must lie between the kernel's figure over the inner window
# (usage) and the outer (wall), and the other way round: an exact bracket, whatever else runs.

CGROUP_ROOT = Path("/sys/fs/cgroup")
TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")
BURNER = "print('ready', flush=True)\nwhile True:\n    pass\n"


def own_cgroup_dir(controller: str) -> Path | None:
    """This process's cgroup directory for `controller` (v1), or its v2 directory.

    Parsed here from /proc/self/cgroup rather than taken from the agent, so the test does not
    trust the code it checks. With a cgroup namespace the own path is not visible below the
    mount and the mount itself is the container's cgroup.
    """
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    base = CGROUP_ROOT if v2 else CGROUP_ROOT / controller
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and controller in controllers.split(",")):
            own = base / path.lstrip("/")
            return own if own.is_dir() else base
    return None


def kernel_cgroup_cpu_ns() -> int | None:
    """The container's CPU time so far, as the kernel accounts it, in ns."""
    directory = own_cgroup_dir("cpuacct")
    if directory is None:
        return None
    try:
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            stat = dict(line.split() for line in (directory / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) * 1000
        return int((directory / "cpuacct.usage").read_text())
    except (OSError, KeyError, ValueError):
        return None


def kernel_host_busy_ns() -> float:
    """Busy CPU time summed over the host's cores from /proc/stat's first line:
    user + nice + system + irq + softirq + steal (guest time is inside user already)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, sys_, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + sys_ + irq + softirq + steal) * TICK_NS


def kernel_memory_used() -> int | None:
    """The container's working set straight from the kernel: usage minus inactive file cache."""
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    directory = own_cgroup_dir("memory")
    if directory is None:
        return None
    try:
        usage = int((directory / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text())
        stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return max(0, usage - int(stat.get("inactive_file" if v2 else "total_inactive_file", 0)))


@dataclass(frozen=True)
class Mark:
    """The kernel's counters at one moment."""

    wall_ns: int
    cgroup_ns: int | None
    host_ns: float

    @staticmethod
    def now() -> Mark:
        return Mark(time.monotonic_ns(), kernel_cgroup_cpu_ns(), kernel_host_busy_ns())


@dataclass(frozen=True)
class Window:
    """Kernel marks around the sampler's first and second readings."""

    before_first: Mark
    after_first: Mark
    before_last: Mark
    after_last: Mark

    def bounds(self, counter: str) -> tuple[float, float]:
        """The kernel's CPU percentage (100 = one core) over the window, as (low, high)."""
        c0, c1, c2, c3 = (getattr(m, counter) for m in (self.before_first, self.after_first,
                                                         self.before_last, self.after_last))
        outer = self.after_last.wall_ns - self.before_first.wall_ns
        inner = self.before_last.wall_ns - self.after_first.wall_ns
        return (c2 - c1) / outer * 100, (c3 - c0) / inner * 100

    @property
    def outer_s(self) -> float:
        return (self.after_last.wall_ns - self.before_first.wall_ns) / 1e9


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def sample_window(sampler: SystemSampler, wait: Callable[[], None]) -> tuple[SystemReading, Window]:
    """Two readings with `wait()` between them, each bracketed by kernel marks."""
    before_first = Mark.now()
    sampler.sample()
    after_first = Mark.now()
    wait()
    before_last = Mark.now()
    reading = sampler.sample()
    after_last = Mark.now()
    return reading, Window(before_first, after_first, before_last, after_last)


def assert_cpu_matches_kernel(reading: SystemReading, window: Window) -> None:
    """Container figure within the cgroup's bracket, host figure within /proc/stat's."""
    low, high = window.bounds("host_ns")
    assert reading.cpu_host_pct is not None
    assert low - 0.01 <= reading.cpu_host_pct <= high + 0.01, (low, reading.cpu_host_pct, high)
    if window.before_first.cgroup_ns is None:  # no cgroup counter: the host view stands in
        assert reading.cpu_container_pct == reading.cpu_host_pct
        return
    low, high = window.bounds("cgroup_ns")
    assert reading.cpu_container_pct is not None
    assert low - 0.01 <= reading.cpu_container_pct <= high + 0.01, (low, reading.cpu_container_pct,
                                                                    high)


class TestRealLoad:
    def _burn(self, procs: int, cpu_s: float) -> None:
        """Run `procs` busy children until each has used `cpu_s` CPU seconds in the window;
        check both CPU figures against the kernel's, and that the container figure counts the
        children's own CPU time (they are in this cgroup, whatever else shares it)."""
        sampler = SystemSampler(CgroupReader(), Path("/"))
        children = [subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE)
                    for _ in range(procs)]
        try:
            for child in children:
                assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            used: list[float] = []

            def until_burned() -> None:
                start = [cpu_seconds(c.pid) for c in children]
                deadline = time.monotonic() + 120
                while any(cpu_seconds(c.pid) - s < cpu_s for c, s in zip(children, start)):
                    assert time.monotonic() < deadline, "the children got no CPU for 2 minutes"
                    time.sleep(0.05)
                used.append(sum(cpu_seconds(c.pid) for c in children) - sum(start))

            reading, window = sample_window(sampler, until_burned)
        finally:
            for child in children:
                child.kill()
                child.wait()
        assert_cpu_matches_kernel(reading, window)
        # The children's CPU time (in whole clock ticks) inside the window, over its outer wall.
        floor = (used[0] - 2 * procs * TICK_NS / 1e9) / window.outer_s * 100
        assert reading.cpu_container_pct is not None and reading.cpu_container_pct >= floor, floor

    def test_one_busy_core_matches_cgroup_usage(self) -> None:
        """One busy child: the figures equal the kernel's over the same window and count the
        child's CPU time in full (100 = one core)."""
        self._burn(1, 1.0)

    def test_two_busy_processes_match_cgroup_usage(self) -> None:
        """Two busy children: summed over cores, so the figure can pass 100; it still equals
        the kernel's and counts both children's CPU time."""
        self._burn(2, 1.0)

    def test_quiet_window_matches_cgroup_usage(self) -> None:
        """Adding no load: the figure is the kernel's rate over the window (whatever else runs
        in the container), not a cumulative or stale value."""
        sampler = SystemSampler(CgroupReader(), Path("/"))
        # The window's length does not matter for the check; one second keeps it well above
        # the time the readings themselves take.
        reading, window = sample_window(sampler, lambda: time.sleep(1.0))
        assert_cpu_matches_kernel(reading, window)

    def test_memory_follows_1gib_allocation(self) -> None:
        """A child holding 1 GiB of touched memory is counted in the container's used memory,
        and the figure is the kernel's working set (usage minus inactive file cache)."""
        sampler = SystemSampler(CgroupReader(), Path("/"))
        child = subprocess.Popen([sys.executable, "-c", "import sys, time\nb = bytearray(1 << 30)\n"
                                  "for i in range(0, len(b), 4096): b[i] = 1\n"
                                  "print('ready', flush=True)\ntime.sleep(300)\n"],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            held = psutil.Process(child.pid).memory_full_info().uss
            # Memory moves both ways as others allocate and free; retry a few times so a burst
            # elsewhere between our reads cannot fail the test, while a wrong formula still does.
            attempts = []
            for _ in range(5):
                first = kernel_memory_used()
                reading = sampler.sample()
                last = kernel_memory_used()
                attempts.append((first, reading.mem_container_used, last))
                if first is None or last is None:  # no memory cgroup: the host view stands in
                    break
                used, slack = reading.mem_container_used, 8 * 2**20
                if min(first, last) - slack <= used <= max(first, last) + slack:
                    break
            else:
                raise AssertionError(f"used memory never matched the kernel's: {attempts}")
        finally:
            child.kill()
            child.wait()
        assert held >= 0.95 * (1 << 30)
        assert reading.mem_container_used >= held, (reading.mem_container_used, held)
        assert reading.mem_container_used <= reading.mem_container_limit

    def test_disk_matches_df(self) -> None:
        """DiskUtilization matches `df`'s Use% within 1 point (df read before and after, as
        other processes may write meanwhile)."""

        def df_use() -> int:
            out = subprocess.run(["df", "-P", "/"], capture_output=True, text=True,
                                 check=True).stdout
            return int(re.findall(r"(\d+)%", out)[-1])

        before = df_use()
        reading = SystemSampler(CgroupReader(), Path("/")).sample()
        after = df_use()
        assert reading.disk_pct is not None
        assert min(before, after) - 1 <= reading.disk_pct <= max(before, after) + 1
