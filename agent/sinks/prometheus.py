"""The Prometheus sink: the latest samples and the agent's health on a local /metrics.

A private registry (never the global one) with one custom collector that
renders the last readings at scrape time, as client_python's process collector
does. Names follow node_exporter/cAdvisor conventions in base units (bytes,
seconds, ratios); GPU series use dcgm-exporter's names and labels so existing
dashboards work. Served by prometheus_client's threaded HTTP server, on
127.0.0.1 unless configured otherwise.

Threads see snapshots: every collector reads structures the event loop changes
(the readings, each part's counters, the request histograms), so a scrape from
the server's thread never iterates them itself. It asks the loop to build the
scrape's metric families (`LoopRegistry`) and renders that finished list, which
nothing changes afterwards. The request path pays nothing for this.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector, CollectorRegistry

from agent.log import get_logger
from agent.model import GpuReading, RequestRecord, SystemReading

PREFIX = "sagemaker_agent"
_log = get_logger("prometheus")


@dataclass(frozen=True, slots=True)
class Series:
    """One labelled self-telemetry value: rendered as `agent_<name>_total`, or a gauge."""

    name: str
    labels: dict[str, str]
    value: float
    gauge: bool = False


@dataclass(slots=True)
class LatestReadings:
    """What the collector renders: written by the samplers and read at scrape time, both
    on the event loop (`LoopRegistry` runs the collectors there)."""

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
        if r.counters is not None:  # exact over any window: rate() of the kernel's counters
            seconds = CounterMetricFamily(f"{PREFIX}_cpu_seconds", "CPU time used, summed "
                                          "over cores (cgroup usage; host: /proc/stat busy)",
                                          labels=["view"])
            if r.counters.cgroup_ns is not None:
                seconds.add_metric(["container"], r.counters.cgroup_ns / 1e9)
            seconds.add_metric(["host"], r.counters.host_busy_ns / 1e9)
            yield seconds
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
        # dcgm-exporter's labels; GPU_I_ID is the MIG device ("" for a whole GPU).
        labels = ["gpu", "UUID", "modelName", "GPU_I_ID"]
        util = _gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels)
        used = _gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels)
        free = _gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels)
        process = _gauge(f"{PREFIX}_gpu_process_memory_used_bytes", "GPU memory held by a "
                         "process of the child's tree (NVML; at most 32 per GPU, the rest "
                         "summed under pid 0, command \"other\")", [*labels, "pid", "command"])
        for g in gpus:
            values = [str(g.index), g.uuid, g.name, "" if g.mig_index is None else str(g.mig_index)]
            if g.utilization_pct is not None:  # absent where NVML does not support it (MIG)
                util.add_metric(values, g.utilization_pct)
            used.add_metric(values, g.memory_used / 2**20)
            free.add_metric(values, (g.memory_total - g.memory_used) / 2**20)
            for proc in g.processes:
                process.add_metric([*values, str(proc.pid), proc.command],
                                   float(proc.memory_used))
        yield from (util, used, free, process)

    def _agent(self, counters: dict[str, float]) -> Iterator[Metric]:
        for name, value in sorted(counters.items()):
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

    Streamed answers add `sagemaker_agent_time_to_first_chunk_seconds` and
    `sagemaker_agent_time_per_output_chunk_seconds` (the OpenTelemetry GenAI names and
    bucket boundaries for streaming), and `sagemaker_agent_concurrent_requests` is the
    gauge of invocations in flight, read at scrape time (`in_flight`, set by the app).
    """

    _LATENCIES = (("model", "Time in the model server or hooked inference (ModelLatency)"),
                  ("container", "First byte in to last byte out (ContainerLatency)"),
                  ("overhead", "ContainerLatency - ModelLatency (OverheadLatency)"))

    def __init__(self, registry: CollectorRegistry) -> None:
        self._classes = [0] * 6  # index = status // 100, 5 for 5xx and beyond
        self._bounds = [b * 1e6 for b in LATENCY_BUCKETS]  # in microseconds, as observed
        self._buckets = {name: [0] * (len(LATENCY_BUCKETS) + 1) for name, _ in self._LATENCIES}
        self._sums = dict.fromkeys(self._buckets, 0.0)
        self._stream_bounds = {name: [b * 1e6 for b in bounds]
                               for name, bounds, _ in self._STREAMS}
        self._stream_buckets = {name: [0] * (len(bounds) + 1)
                                for name, bounds, _ in self._STREAMS}
        self._stream_sums = dict.fromkeys(self._stream_buckets, 0.0)
        self.in_flight: Callable[[], int] | None = None
        registry.register(self)

    # OpenTelemetry GenAI semantic conventions' explicit bucket boundaries (seconds).
    _STREAMS = (
        ("time_to_first_chunk", (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
         "Streamed answers: request sent to the model -> first body byte (ModelTimeToFirstByte)"),
        ("time_per_output_chunk", (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                   0.75, 1.0, 2.5),
         ("Streamed answers: time between two reads carrying body bytes "
          "(ModelInterChunkLatency)")))

    def observe(self, record: RequestRecord) -> None:
        self._classes[min(record.status // 100, 5)] += 1
        self._one("model", record.model_us)
        if record.container_us is not None:
            self._one("container", record.container_us)
            self._one("overhead", max(0.0, record.container_us - record.model_us))
        if record.first_byte_us is not None:
            self._stream("time_to_first_chunk", record.first_byte_us)
            for gap in record.gaps_us or ():
                self._stream("time_per_output_chunk", gap)

    def _stream(self, name: str, micros: float) -> None:
        self._stream_buckets[name][bisect.bisect_left(self._stream_bounds[name], micros)] += 1
        self._stream_sums[name] += micros

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
        for name, bounds, doc in self._STREAMS:
            cumulative, running = [], 0
            for bound, count in zip([*bounds, math.inf], self._stream_buckets[name],
                                    strict=True):
                running += count
                cumulative.append((floatToGoString(bound), float(running)))
            yield HistogramMetricFamily(f"{PREFIX}_{name}_seconds", doc, buckets=cumulative,
                                        sum_value=self._stream_sums[name] / 1e6)
        if self.in_flight is not None:
            yield GaugeMetricFamily(f"{PREFIX}_concurrent_requests", "Invocations in flight in "
                                    "the container (ConcurrentRequestsPerModel)",
                                    value=float(self.in_flight()))


# How long a scrape from another thread waits for the loop to build its families before it
# serves the previous ones (Prometheus' own scrape timeout is 10 s by default).
SNAPSHOT_TIMEOUT_S = 2.0


class LoopRegistry(CollectorRegistry):
    """A private registry whose collectors run on the event loop, whoever scrapes.

    Iterating the loop's dictionaries from prometheus_client's server thread raised
    `RuntimeError: dictionary changed size during iteration`. Here `collect` from another
    thread hands the loop one callback that builds every family (what `collect` of a plain
    registry does), waits for that immutable tuple and yields it. On the loop's own thread
    (the proxy's /metrics), or before `bind`, it builds directly. When the loop does not
    answer within `timeout` (blocked, or stopped at exit) the previous scrape's families
    are served again and counted in `stale_scrapes`.
    """

    def __init__(self, timeout: float = SNAPSHOT_TIMEOUT_S) -> None:
        super().__init__(auto_describe=False)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout
        self._last: tuple[Metric, ...] = ()
        self._stale_lock = threading.Lock()
        self.stale_scrapes = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that owns what the collectors read (call once it runs)."""
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        return iter(self.snapshot())

    def snapshot(self) -> tuple[Metric, ...]:
        """Every family of one scrape, built on the loop."""
        loop = self.loop
        if loop is None or _running_loop() is loop:
            return self._build()
        future: concurrent.futures.Future[tuple[Metric, ...]] = concurrent.futures.Future()

        def build() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._build())
                except BaseException as exc:  # noqa: BLE001 - handed to the scraping thread
                    future.set_exception(exc)

        try:
            if not loop.is_running():
                raise RuntimeError("the event loop has stopped")
            loop.call_soon_threadsafe(build)
            families = future.result(self._timeout)
        except (RuntimeError, TimeoutError):  # closed, stopped, or too busy to answer
            future.cancel()
            with self._stale_lock:
                self.stale_scrapes += 1
            return self._last
        self._last = families
        return families

    def _build(self) -> tuple[Metric, ...]:
        families = tuple(CollectorRegistry.collect(self))
        self._last = families
        return families


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def registry_for(latest: LatestReadings) -> LoopRegistry:
    """A private registry rendering `latest` (never the process-global one)."""
    registry = LoopRegistry()
    registry.register(ReadingsCollector(latest))
    return registry


def page(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry` (for /metrics on the proxy's port)."""
    return generate_latest(registry)


def serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Start /metrics on host:port in a daemon thread; return the server (to shut down).

    Raises:
        OSError: the address is taken or cannot be bound.
    """
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


class PrometheusSink:
    """The local /metrics page: the latest readings, the request histograms, the agent's
    counters. Scrapes pull; nothing is pushed, so `stop` has nothing to flush.

    Args:
        address: (host, port) to serve on, or None (the proxy may still serve `page`).
        counters: the agent's flat counters, read at scrape time.
        series: the agent's labelled counters and gauges, read at scrape time.
    """

    name = "prometheus"

    def __init__(self, address: tuple[str, int] | None, *,
                 counters: Callable[[], dict[str, float]] = dict,
                 series: Callable[[], list[Series]] = list) -> None:
        self.address = address
        self.latest = LatestReadings(counters=counters, series=series)
        self.registry = registry_for(self.latest)
        self.requests = RequestInstruments(self.registry)
        self._server: WSGIServer | None = None

    def on_reading(self, system: SystemReading, gpus: Sequence[GpuReading]) -> None:
        """The newest instance sample, rendered at the next scrape."""
        self.latest.system, self.latest.gpus = system, list(gpus)

    def page(self) -> bytes:
        return page(self.registry)

    def start(self) -> None:
        """Serve /metrics (raises OSError when the address cannot be bound)."""
        loop = _running_loop()
        if loop is not None:  # from now on every scrape is collected on the loop
            self.registry.bind(loop)
        if self.address is not None:
            self._server = serve(self.registry, *self.address)
            _log.info("prometheus_started", address="%s:%d" % self.address)

    async def stop(self, deadline: float) -> None:
        """Nothing is queued: stop serving (scrapes from now on would see a stopped loop)."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # returns within its 0.5 s poll
            server.server_close()

    def counters(self) -> dict[str, int]:
        """Scrapes served the previous figures because the loop did not answer in time."""
        return {"prometheus_stale_scrapes": self.registry.stale_scrapes}
