"""cgroup v1/v2 arithmetic: CPU limits, utilization and memory as SageMaker scales them.

CPUUtilization is the sum over cores of 0-100 (so 0-400 on 4 cores): CPU time
used over wall time, times 100. MemoryUtilization is 0-100 of the limit, with
reclaimable page cache (`inactive_file`) not counted as used, as `docker stats`
and the kubelet do.
"""

from __future__ import annotations

# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
V1_UNLIMITED = 1 << 62


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("quota period" or "max period") -> cores, or None if unlimited."""
    parts = text.split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    period = float(parts[1]) if len(parts) > 1 else 100_000.0
    return float(parts[0]) / period if period > 0 else None


def parse_v1_quota(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` -> cores, or None (-1 = unlimited)."""
    quota, period = int(quota_us), int(period_us)
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cpuset(text: str) -> int | None:
    """A cpuset list like "0-3,6" -> number of CPUs, or None when empty."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count or None


def effective_cores(quota: float | None, cpuset: int | None, host: int) -> float:
    """The container's CPUs: the CFS quota, else the cpuset, else the host's count."""
    if quota is not None:
        return min(quota, float(cpuset or host))
    return float(cpuset or host)


def cpu_percent(usage_delta_ns: float, wall_delta_ns: float) -> float:
    """CPU time over wall time, as 0-100 per core summed (100 = one core busy)."""
    if wall_delta_ns <= 0:
        return 0.0
    return max(0.0, usage_delta_ns / wall_delta_ns * 100.0)


def proc_stat_busy_ticks(first_line: str) -> int | None:
    """/proc/stat's `cpu` line -> non-idle time in clock ticks, summed over cores:
    user + nice + system + irq + softirq + steal (guest time is already inside user and
    nice; idle and iowait are not busy). None when the line is not a `cpu` line."""
    fields = first_line.split()
    if len(fields) < 5 or fields[0] != "cpu":
        return None
    try:
        values = [int(v) for v in fields[1:9]] + [0] * 8
    except ValueError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq + steal


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (cpu.stat, memory.stat, memory.events) -> dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value.strip())
        except ValueError:
            continue
    return out


def memory_used(usage: int, stat: dict[str, int], version: int) -> int:
    """Working set: usage minus inactive file cache (v1 names it total_inactive_file)."""
    inactive = stat.get("inactive_file" if version == 2 else "total_inactive_file", 0)
    return max(0, usage - inactive)


def memory_limit(raw: str, host_total: int) -> int:
    """`memory.max` / `memory.limit_in_bytes` -> bytes; host total when unlimited."""
    value = raw.strip()
    if value == "max":
        return host_total
    limit = int(value)
    return host_total if limit >= V1_UNLIMITED or limit <= 0 else min(limit, host_total)
