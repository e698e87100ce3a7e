"""The Prometheus sink: the latest samples and the agent's health on a local /metrics.

A private registry (never the global one) with one custom collector that
renders the last readings at scrape time, as client_python's process collector
does. Names follow node_exporter/cAdvisor conventions in base units (bytes,
seconds, ratios); GPU series use dcgm-exporter's names and labels so existing
dashboards work. Served by prometheus_client's threaded HTTP server, on
127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector, CollectorRegistry

from agent.model import GpuReading, RequestRecord, SystemReading

PREFIX = "sagemaker_agent"


@dataclass(frozen=True, slots=True)
class Series:
    """One labelled self-telemetry value: rendered as `agent_<name>_total`, or a gauge."""

    name: str
    labels: dict[str, str]
    value: float
    gauge: bool = False


@dataclass(slots=True)
class LatestReadings:
    """What the collector renders: written by the samplers, read at scrape time."""

    system: SystemReading | None = None
    gpus: list[GpuReading] = field(default_factory=list)
    counters: Callable[[], dict[str, float]] = dict
    series: Callable[[], list[Series]] = list


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


class ReadingsCollector(Collector):
    """Builds metric families from `LatestReadings` on every scrape."""

    def __init__(self, latest: LatestReadings) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        yield from self._system(self._latest.system)
        yield from self._gpus(self._latest.gpus)
        yield from self._agent(self._latest.counters())
        yield from self._labelled(self._latest.series())

    def _system(self, r: SystemReading | None) -> Iterator[Metric]:
        if r is None:
            return
        cpu = _gauge(f"{PREFIX}_cpu_usage_cores", "CPU in use, in cores (SageMaker "
                     "CPUUtilization / 100)", ["view"])
        for view, pct in (("container", r.cpu_container_pct), ("host", r.cpu_host_pct)):
            if pct is not None:
                cpu.add_metric([view], pct / 100.0)
        yield cpu
        limit = _gauge(f"{PREFIX}_cpu_limit_cores", "CPUs available", ["view"])
        limit.add_metric(["container"], r.cores_container)
        limit.add_metric(["host"], float(r.cores_host))
        yield limit
        used = _gauge(f"{PREFIX}_memory_used_bytes", "Memory in use (container: working set)",
                      ["view"])
        used.add_metric(["container"], float(r.mem_container_used))
        used.add_metric(["host"], float(r.mem_host_used))
        yield used
        mem_limit = _gauge(f"{PREFIX}_memory_limit_bytes", "Memory limit (host total when "
                           "unlimited)", ["view"])
        mem_limit.add_metric(["container"], float(r.mem_container_limit))
        mem_limit.add_metric(["host"], float(r.mem_host_total))
        yield mem_limit
        if r.disk_used is not None and r.disk_size is not None:
            yield GaugeMetricFamily(f"{PREFIX}_disk_used_bytes", "Used bytes of the measured "
                                    "filesystem", value=float(r.disk_used))
            yield GaugeMetricFamily(f"{PREFIX}_disk_size_bytes", "Size of the measured filesystem "
                                    "(used + available to users)", value=float(r.disk_size))
        if r.throttled_periods is not None:
            yield CounterMetricFamily(f"{PREFIX}_cpu_throttled_periods", "CFS periods in which "
                                      "the container was throttled", value=r.throttled_periods)
        if r.throttled_seconds is not None:
            yield CounterMetricFamily(f"{PREFIX}_cpu_throttled_seconds", "Time the container "
                                      "was throttled", value=r.throttled_seconds)
        if r.oom_kills is not None:
            yield CounterMetricFamily(f"{PREFIX}_oom_kills", "Processes of the container killed "
                                      "by the OOM killer", value=r.oom_kills)

    def _gpus(self, gpus: list[GpuReading]) -> Iterator[Metric]:
        if not gpus:
            return
        labels = ["gpu", "UUID", "modelName"]
        util = _gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels)
        used = _gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels)
        free = _gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels)
        for g in gpus:
            values = [str(g.index), g.uuid, g.name]
            util.add_metric(values, g.utilization_pct)
            used.add_metric(values, g.memory_used / 2**20)
            free.add_metric(values, (g.memory_total - g.memory_used) / 2**20)
        yield from (util, used, free)

    def _agent(self, counters: dict[str, float]) -> Iterator[Metric]:
        for name, value in sorted(counters.items()):
            kind, _, rest = name.partition(":")
            if kind == "gauge":
                yield GaugeMetricFamily(f"agent_{rest}", f"agent self-telemetry: {rest}",
                                        value=value)
            else:
                yield CounterMetricFamily(f"agent_{name}", f"agent self-telemetry: {name}",
                                          value=value)


    def _labelled(self, series: list[Series]) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for item in series:
            family = families.get(item.name)
            if family is None:
                kind = GaugeMetricFamily if item.gauge else CounterMetricFamily
                family = families[item.name] = kind(f"agent_{item.name}",
                                                    f"agent self-telemetry: {item.name}",
                                                    labels=sorted(item.labels))
            family.add_metric([item.labels[k] for k in sorted(item.labels)], float(item.value))
        yield from families.values()


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class RequestInstruments(Collector):
    """Invocation counters and latency histograms, with SageMaker's meaning.

    `sagemaker_agent_invocations_total{status_class}` counts requests by 2xx/4xx/5xx
    (rate() of the 4xx/5xx series over all is the error rate); the histograms are
    seconds (base units), where CloudWatch gets microseconds. Kept as plain
    cumulative counts and rendered at scrape time: an observation is a few list
    updates (about 1 µs), where three prometheus_client Histograms cost 5.
    """

    _LATENCIES = (("model", "Time in the model server or hooked inference (ModelLatency)"),
                  ("container", "First byte in to last byte out (ContainerLatency)"),
                  ("overhead", "ContainerLatency - ModelLatency (OverheadLatency)"))

    def __init__(self, registry: CollectorRegistry) -> None:
        self._classes = [0] * 6  # index = status // 100, 5 for 5xx and beyond
        self._bounds = [b * 1e6 for b in LATENCY_BUCKETS]  # in microseconds, as observed
        self._buckets = {name: [0] * (len(LATENCY_BUCKETS) + 1) for name, _ in self._LATENCIES}
        self._sums = dict.fromkeys(self._buckets, 0.0)
        registry.register(self)

    def observe(self, record: RequestRecord) -> None:
        self._classes[min(record.status // 100, 5)] += 1
        self._one("model", record.model_us)
        if record.container_us is not None:
            self._one("container", record.container_us)
            self._one("overhead", max(0.0, record.container_us - record.model_us))

    def _one(self, name: str, micros: float) -> None:
        self._buckets[name][bisect.bisect_left(self._bounds, micros)] += 1
        self._sums[name] += micros

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily(f"{PREFIX}_invocations", "Requests to /invocations",
                                     labels=["status_class"])
        for index, label in ((1, "1xx"), (2, "2xx"), (3, "3xx"), (4, "4xx"), (5, "5xx")):
            counts.add_metric([label], float(self._classes[index]))
        yield counts
        for name, doc in self._LATENCIES:
            cumulative, running = [], 0
            for bound, count in zip([*LATENCY_BUCKETS, math.inf], self._buckets[name],
                                    strict=True):
                running += count
                cumulative.append((floatToGoString(bound), float(running)))
            yield HistogramMetricFamily(f"{PREFIX}_{name}_latency_seconds", doc,
                                        buckets=cumulative, sum_value=self._sums[name] / 1e6)


def registry_for(latest: LatestReadings) -> CollectorRegistry:
    """A private registry rendering `latest` (never the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReadingsCollector(latest))
    return registry


def page(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry` (for /metrics on the proxy's port)."""
    return generate_latest(registry)


def serve(registry: CollectorRegistry, host: str, port: int) -> None:
    """Start /metrics on host:port in a daemon thread.

    Raises:
        OSError: the address is taken or cannot be bound.
    """
    start_http_server(port, addr=host, registry=registry)
