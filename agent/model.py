"""Value types that flow from sources through aggregation to sinks.

Sources emit records and readings (small frozen dataclasses and NamedTuples, so
they can cross threads and tasks safely); aggregation keeps `Statistic`s per
`MetricKey` and hands `ClosedInterval`s to the sinks. Every stage imports these
types from here, so no stage needs to import another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


# CloudWatch dimensions as ((name, value), ...): hashable, ordered.
Dimensions = tuple[tuple[str, str], ...]


class Resource(str, Enum):
    """The kind of SageMaker resource the container belongs to."""

    ENDPOINT = "endpoint"
    TRAINING = "training"
    TRANSFORM = "transform"
    PROCESSING = "processing"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this container is, as SageMaker names things.

    Attributes:
        resource: endpoint, training, transform or processing.
        endpoint_name: the endpoint (endpoint resource).
        variant_name: the production variant (endpoint resource).
        container_name: the pipeline container's ContainerHostname, or None.
        job_name: the training, transform or processing job.
        host: instance id (endpoint, transform), `algo-N` (training) or hostname.
        start_epoch: Unix seconds when the agent started (used in stream names).
    """

    resource: Resource
    endpoint_name: str
    variant_name: str
    container_name: str | None
    job_name: str
    host: str
    start_epoch: int


class LogEvent(NamedTuple):
    """One CloudWatch Logs event: a line, or several joined (a traceback).

    A NamedTuple rather than a frozen dataclass: one is built for every line a
    busy child prints, and a tuple is about 3x cheaper to create.

    Attributes:
        timestamp_ms: arrival time of the event's first line, ms since the epoch.
        message: valid UTF-8 text, at most `MAX_EVENT_BYTES` encoded.
        stream: "stdout" or "stderr", the child's stream it came from.
        size: encoded size of `message` in bytes, as PutLogEvents counts it
            (without its 26 B per-event overhead); kept so batching never re-encodes.
    """

    timestamp_ms: int
    message: str
    stream: str
    size: int


# RequestRecord.kind: an invocation, or a multi-model endpoint's model load or unload.
INVOKE, LOAD, UNLOAD = 1, 2, 3


class RequestRecord(NamedTuple):
    """One counted request, as the proxy or a hook saw it.

    Attributes:
        status: the HTTP status answered (502/504 for upstream failures).
        container_us: ContainerLatency, first byte in to last byte out, or None
            when the source cannot see the container's front (a hook in the model).
        model_us: ModelLatency: time in the model server or the hooked inference code.
        kind: INVOKE, or LOAD / UNLOAD (`POST /models`, `DELETE /models/{name}`).
        model: TargetModel of an invocation (the `X-Amzn-SageMaker-Target-Model` header,
            else the name in `/models/{name}/invoke`); the model name loaded or unloaded;
            None for a plain `/invocations`.
        component: the `X-Amzn-SageMaker-Inference-Component` header, or None.
        first_byte_us: a streamed answer's first body byte, from the request sent upstream.
        gaps_us: a streamed answer's times between two reads that carried body bytes.
    """

    status: int
    container_us: float | None
    model_us: float
    kind: int = INVOKE
    model: str | None = None
    component: str | None = None
    first_byte_us: float | None = None
    gaps_us: list[float] | None = None


def _percent(part: float, whole: float) -> float:
    return part / whole * 100.0 if whole > 0 else 0.0


class CpuCounters(NamedTuple):
    """The kernel's cumulative CPU counters at one moment (cheap to read: two small files).

    Interval CPU figures are differences of these read at the interval's boundaries, so
    they are exact whatever the sampling did in between.

    Attributes:
        wall: Unix seconds when the counters were read.
        cgroup_ns: the container's CPU time (cgroup v2 `usage_usec`, v1 `cpuacct.usage`), or
            None without a cgroup CPU counter (the host counter stands in).
        host_busy_ns: non-idle CPU time summed over the host's cores (/proc/stat).
    """

    wall: float
    cgroup_ns: int | None
    host_busy_ns: float


@dataclass(frozen=True, slots=True)
class SystemReading:
    """One sample. Percentages are SageMaker-scaled (CPU: 0-100 per core, summed).

    The CPU percentages are rates over the `window_s` seconds ending at `timestamp`
    (when `counters` were read); `counters` are the cumulative values behind them.
    """

    timestamp: float
    cpu_container_pct: float | None
    cpu_host_pct: float | None
    cores_container: float
    cores_host: int
    mem_container_used: int
    mem_container_limit: int
    mem_host_used: int
    mem_host_total: int
    disk_used: int | None
    disk_size: int | None
    throttled_periods: int | None
    throttled_seconds: float | None
    oom_kills: int | None
    counters: CpuCounters | None = None
    window_s: float | None = None

    @property
    def mem_container_pct(self) -> float:
        return _percent(self.mem_container_used, self.mem_container_limit)

    @property
    def mem_host_pct(self) -> float:
        return _percent(self.mem_host_used, self.mem_host_total)

    @property
    def disk_pct(self) -> float | None:
        if self.disk_used is None or not self.disk_size:
            return None
        return _percent(self.disk_used, self.disk_size)


class GpuProcess(NamedTuple):
    """A process of the child's tree holding GPU memory (NVML's running compute processes)."""

    pid: int
    command: str
    memory_used: int


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU (or one MIG device of a GPU) at one moment.

    `utilization_pct` is None where NVML does not support it (MIG devices, some vGPUs);
    `mig_index` is the MIG device's index on GPU `index`, None for a whole GPU; `processes`
    are the child's tree's processes on it (bounded; the rest folded into pid 0, "other").
    """

    index: int
    uuid: str
    name: str
    utilization_pct: float | None
    memory_used: int
    memory_total: int
    mig_index: int | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_pct(self) -> float:
        return self.memory_used / self.memory_total * 100.0 if self.memory_total else 0.0


# Distinct values kept per statistic before values are rounded to a coarser grid.
# Each datum carries at most 150 (PutMetricData); more are split across datums.
MAX_DISTINCT_VALUES = 1500
# Relative precision of the rounding grid when a distribution overflows.
ROUNDING_RELATIVE_ERROR = 0.005


class MetricKey(NamedTuple):
    """What a figure is: namespace, name, dimensions, unit."""

    namespace: str
    name: str
    dimensions: Dimensions
    unit: str


@dataclass(slots=True)
class Statistic:
    """Statistics of one metric over one interval."""

    count: float = 0.0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    values: dict[float, float] | None = None

    def add(self, value: float, weight: float = 1.0) -> None:
        self.count += weight
        self.total += value * weight
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        if self.values is not None:
            if len(self.values) >= MAX_DISTINCT_VALUES and value not in self.values:
                value = round_relative(value)
            self.values[value] = self.values.get(value, 0.0) + weight


def round_relative(value: float, error: float = ROUNDING_RELATIVE_ERROR) -> float:
    """Round to a logarithmic grid whose relative error is at most `error`."""
    if value <= 0:
        return value
    base = 1.0 + 2 * error
    return base ** round(math.log(value, base))


@dataclass(frozen=True, slots=True)
class ClosedInterval:
    """Everything recorded between `start` and `start + length` (Unix seconds): SageMaker's
    figures in `stats`, custom (StatsD) ones in `custom`, never sent in the same call."""

    start: int
    length: int
    stats: dict[MetricKey, Statistic]
    custom: dict[MetricKey, Statistic] = field(default_factory=dict)


@dataclass(slots=True)
class RequestTally:
    """Requests of one interval, kept compactly: counts and latency value -> count maps.

    A request costs a few dict updates here (the hook and StatsD path must take
    100,000 a second); `Aggregator.merge` turns a tally into the usual statistics
    once per interval.
    """

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    model_errors: int = 0
    model: dict[float, int] = field(default_factory=dict)
    container: dict[float, int] = field(default_factory=dict)
    overhead: dict[float, int] = field(default_factory=dict)
    first_byte: dict[float, int] = field(default_factory=dict)
    inter_chunk: dict[float, int] = field(default_factory=dict)

    def add(self, status: int, model_us: float, container_us: float | None) -> None:
        self.requests += 1
        # InvocationModelErrors: any answer but 2XX, the proxy's 502/504 included; not
        # 499/408, where the client left or stalled before the model was asked for an answer.
        if status >= 300 or status < 200:
            if status >= 500:
                self.errors_5xx += 1
                self.model_errors += 1
            elif status >= 400:
                self.errors_4xx += 1
                if status != 499 and status != 408:
                    self.model_errors += 1
            else:
                self.model_errors += 1
        model = float(round(model_us))
        self.model[model] = self.model.get(model, 0) + 1
        if container_us is not None:
            container = float(round(container_us))
            self.container[container] = self.container.get(container, 0) + 1
            overhead = max(0.0, container - model)
            self.overhead[overhead] = self.overhead.get(overhead, 0) + 1

    def add_stream(self, first_byte_us: float, gaps_us: list[float] | None) -> None:
        """A streamed answer's time to first byte and its gaps between reads (whole µs)."""
        first = float(round(first_byte_us))
        self.first_byte[first] = self.first_byte.get(first, 0) + 1
        if gaps_us:
            gaps = self.inter_chunk
            for gap in gaps_us:
                value = float(round(gap))
                gaps[value] = gaps.get(value, 0) + 1
