"""Value types that flow from sources through aggregation to sinks.

They are small frozen dataclasses so they can cross threads and tasks safely.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class RequestRecord(NamedTuple):
    """One /invocations request, as the proxy or a hook saw it.

    Attributes:
        status: the HTTP status answered (502/504 for upstream failures).
        container_us: ContainerLatency, first byte in to last byte out, or None
            when the source cannot see the container's front (a hook in the model).
        model_us: ModelLatency: time in the model server or the hooked inference code.
    """

    status: int
    container_us: float | None
    model_us: float


def _percent(part: float, whole: float) -> float:
    return part / whole * 100.0 if whole > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SystemReading:
    """One sample. Percentages are SageMaker-scaled (CPU: 0-100 per core, summed)."""

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


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU at one moment."""

    index: int
    uuid: str
    name: str
    utilization_pct: float
    memory_used: int
    memory_total: int

    @property
    def memory_pct(self) -> float:
        return self.memory_used / self.memory_total * 100.0 if self.memory_total else 0.0
