"""System sampler: CPU, memory and disk, as the container sees them and as the host does.

The container view reads the cgroup (v2 unified, or v1 cpuacct/cpu/memory);
the host view reads /proc through psutil. The cgroup root is a parameter so tests
can point it at a fake /sys/fs/cgroup tree. A file that is missing degrades that
figure to the host view; sampling never raises.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from agent.model import CpuCounters, SystemReading
from agent.rules import cgroup

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
# /proc/stat counts in clock ticks (USER_HZ, 100 a second on Linux).
TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def own_cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """/proc/self/cgroup -> {controller: path}; v2's line is under key ''."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                out[controller] = parts[2]
    return out


class CgroupReader:
    """Reads this process's cgroup, v2 or v1.

    Args:
        root: the cgroup mount (normally /sys/fs/cgroup).
        self_paths: {controller: path} from /proc/self/cgroup; inside a container with a
            cgroup namespace this is "/", i.e. the root itself.
    """

    def __init__(self, root: Path = DEFAULT_CGROUP_ROOT, self_paths: dict[str, str] | None = None) -> None:
        if self_paths is None:
            self_paths = own_cgroup_paths(_read(Path("/proc/self/cgroup")) or "")
        self.version = 2 if (root / "cgroup.controllers").exists() else 1
        if self.version == 2:
            self._dir = {"": self._locate(root, self_paths.get("", "/"))}
        else:
            self._dir = {c: self._locate(root / c, self_paths.get(c, "/"))
                         for c in ("cpuacct", "cpu", "memory", "cpuset")}

    @staticmethod
    def _locate(base: Path, rel: str) -> Path:
        candidate = base / rel.lstrip("/")
        return candidate if candidate.is_dir() else base

    def _file(self, controller: str, name: str) -> str | None:
        directory = self._dir[""] if self.version == 2 else self._dir[controller]
        return _read(directory / name)

    def cpu_usage_ns(self) -> int | None:
        if self.version == 2:
            text = self._file("", "cpu.stat")
            usec = cgroup.parse_flat_keyed(text).get("usage_usec") if text else None
            return None if usec is None else usec * 1000
        text = self._file("cpuacct", "cpuacct.usage")
        return int(text) if text and text.strip().isdigit() else None

    def cpu_quota(self) -> float | None:
        if self.version == 2:
            text = self._file("", "cpu.max")
            return cgroup.parse_cpu_max(text) if text else None
        quota, period = self._file("cpu", "cpu.cfs_quota_us"), self._file("cpu", "cpu.cfs_period_us")
        return cgroup.parse_v1_quota(quota, period) if quota and period else None

    def cpuset(self) -> int | None:
        name = "cpuset.cpus.effective" if self.version == 2 else "cpuset.effective_cpus"
        text = self._file("cpuset", name) or self._file("cpuset", "cpuset.cpus")
        return cgroup.parse_cpuset(text) if text else None

    def throttling(self) -> tuple[int | None, float | None]:
        text = self._file("cpu", "cpu.stat")
        if not text:
            return None, None
        stat = cgroup.parse_flat_keyed(text)
        periods = stat.get("nr_throttled")
        if self.version == 2:
            usec = stat.get("throttled_usec")
            return periods, None if usec is None else usec / 1e6
        ns = stat.get("throttled_time")
        return periods, None if ns is None else ns / 1e9

    def memory(self, host_total: int) -> tuple[int, int] | None:
        usage_name, limit_name = (("memory.current", "memory.max") if self.version == 2
                                  else ("memory.usage_in_bytes", "memory.limit_in_bytes"))
        usage, limit = self._file("memory", usage_name), self._file("memory", limit_name)
        if usage is None or not usage.strip().isdigit():
            return None
        stat = cgroup.parse_flat_keyed(self._file("memory", "memory.stat") or "")
        used = cgroup.memory_used(int(usage), stat, self.version)
        return used, cgroup.memory_limit(limit or "max", host_total)

    def oom_kills(self) -> int | None:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        text = self._file("memory", name)
        return cgroup.parse_flat_keyed(text).get("oom_kill") if text else None


class SystemSampler:
    """Takes `SystemReading`s; CPU figures are rates since the previous sample.

    Args:
        cgroups: the cgroup reader.
        disk_path: the filesystem measured by DiskUtilization, or None.
        proc_stat: /proc/stat (a parameter for tests).
    """

    def __init__(self, cgroups: CgroupReader, disk_path: Path | None, *,
                 proc_stat: Path = PROC_STAT) -> None:
        self._cg = cgroups
        self._disk = disk_path
        self._proc_stat = proc_stat
        self._host_cores = psutil.cpu_count() or 1
        self._last: tuple[int, CpuCounters] | None = None
        self.samples = 0

    def counters(self) -> CpuCounters:
        """The cumulative CPU counters now: two small file reads (about 50 us), cheap
        enough for the event loop once per interval."""
        usage = self._cg.cpu_usage_ns()
        busy = _host_busy_ns(self._proc_stat)
        return CpuCounters(time.time(), usage, busy)

    def sample(self) -> SystemReading:
        """Read everything once (blocking file reads: call it off the event loop).

        The CPU counters are read first, so the reading's `timestamp` is the moment they
        describe (the sampler schedules that moment on the wall clock's seconds)."""
        now_ns = time.monotonic_ns()
        counters = self.counters()
        cpu_container = cpu_host = window = None
        if self._last is not None:
            last_ns, last = self._last
            wall = now_ns - last_ns
            window = wall / 1e9
            if counters.cgroup_ns is not None and last.cgroup_ns is not None:
                cpu_container = cgroup.cpu_percent(counters.cgroup_ns - last.cgroup_ns, wall)
            cpu_host = cgroup.cpu_percent(counters.host_busy_ns - last.host_busy_ns, wall)
        self._last = (now_ns, counters)

        vm = psutil.virtual_memory()
        host_used = vm.total - vm.available
        memory = self._cg.memory(vm.total) or (host_used, vm.total)
        disk_used = disk_size = None
        if self._disk is not None:
            try:
                st = os.statvfs(self._disk)
                disk_used = (st.f_blocks - st.f_bfree) * st.f_frsize
                disk_size = disk_used + st.f_bavail * st.f_frsize
            except OSError:
                pass
        periods, throttled = self._cg.throttling()
        self.samples += 1
        return SystemReading(
            timestamp=counters.wall,
            cpu_container_pct=cpu_container if counters.cgroup_ns is not None else cpu_host,
            cpu_host_pct=cpu_host,
            cores_container=cgroup.effective_cores(self._cg.cpu_quota(), self._cg.cpuset(),
                                                   self._host_cores),
            cores_host=self._host_cores,
            mem_container_used=memory[0], mem_container_limit=memory[1],
            mem_host_used=host_used, mem_host_total=vm.total,
            disk_used=disk_used, disk_size=disk_size,
            throttled_periods=periods, throttled_seconds=throttled,
            oom_kills=self._cg.oom_kills(),
            counters=counters, window_s=window,
        )


def _host_busy_ns(proc_stat: Path) -> float:
    """CPU time spent not idle, summed over all cores (/proc/stat's first line), in ns;
    psutil's figure when the file cannot be parsed."""
    try:
        with proc_stat.open() as f:
            ticks = cgroup.proc_stat_busy_ticks(f.readline())
    except OSError:
        ticks = None
    if ticks is not None:
        return ticks * TICK_NS
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return (total - idle) * 1e9


def default_disk_path() -> Path:
    """/opt/ml when it exists (SageMaker's volume), else /."""
    return Path("/opt/ml") if Path("/opt/ml").is_dir() else Path("/")
