"""The composition root: builds sources and sinks from `Settings`, runs them, shuts down in order.

Start order: sinks, then sources, then the child. Stop order (when the child
exits, or on SIGTERM with no child): the child's pipes drain, sources stop,
the sinks flush what is buffered within `shutdown_timeout`, and the agent
returns the child's exit code. Only this module sees both sources and sinks.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from agent.aggregate import Aggregator, MetricKey, RequestTally
from agent.config import Settings
from agent.log import get_logger
from agent.model import Dimensions, Identity, RequestRecord, Resource
from agent.rules import naming
from agent.rules.batching import LOG_BATCH_MAX_BYTES
from agent.rules.instance_metrics import instance_figures
from agent.rules.invocation_metrics import INVOCATION_METRICS, LATENCIES, invocation_counts
from agent.rules.statsd import INVOCATION, Sample, invocation_record
from agent.sinks import prometheus
from agent.sinks.aws import AwsCaller
from agent.sinks.cloudwatch_logs import CloudWatchLogsSink
from agent.sinks.cloudwatch_metrics import CloudWatchMetricsSink
from agent.sinks.file import FileSink
from agent.sources.child_output import ChildOutputSource, Intake, relay
from agent.sources.gpu import GpuSampler
from agent.sources.proxy import ProxyTimeouts, RequestProxy
from agent.sources.statsd import DatagramIntake, drain, listen_udp, listen_unix
from agent.sources.system import CgroupReader, SystemSampler, default_disk_path
from agent.stdio import STDERR, STDOUT
from agent.supervisor import FORWARDED, Supervisor

# After the child exits, how long its pipes may stay open (a grandchild holding them)
# before the agent stops reading and flushes what it has.
PIPE_DRAIN_S = 2.0
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126
MIB = 1 << 20

_log = get_logger("app")


@dataclass(slots=True)
class Pipeline:
    """The running parts, for shutdown and self-telemetry."""

    file_sink: FileSink | None
    caller: AwsCaller
    logs: CloudWatchLogsSink
    metrics: CloudWatchMetricsSink
    instance: InstanceMetrics
    tasks: list[asyncio.Task[None]]
    senders: list[asyncio.Task[None]] = field(default_factory=list)
    intake: Intake | None = None
    registry: CollectorRegistry | None = None
    requests: RequestMetrics | None = None
    proxy: RequestProxy | None = None
    datagrams: DatagramIntake | None = None
    hook_socket: Path | None = None
    listeners: list[asyncio.BaseTransport] = field(default_factory=list)

    def stats(self) -> dict[str, int]:
        """Every counter, flat, for the last log line."""
        out = {f"log_{k}": v for k, v in self.logs.stats.items()}
        out.update({f"metric_{k}": v for k, v in self.metrics.stats.items()})
        for prefix, outbox in (("log_events", self.logs.outbox),
                               ("metric_requests", self.metrics.outbox)):
            for reason, count in outbox.stats.dropped.items():
                out[f"{prefix}_dropped_{reason}"] = count
            out[f"{prefix}_spilled"] = outbox.stats.spilled_items
            out[f"{prefix}_restored"] = outbox.stats.restored_items
            out[f"{prefix}_unsent"] = outbox.pending_items
        out["log_events_possible_duplicates"] = self.caller.stats["possible_duplicates",
                                                                   "PutLogEvents", ""]
        out["log_delivery_stalls"] = self.logs.stalls
        out["log_batches_overlapped"] = self.logs.overlapped
        out["metric_delivery_stalls"] = self.metrics.stalls
        out["retries"] = sum(v for k, v in self.caller.stats.items() if k[0] == "retries")
        if self.requests is not None:
            out["requests"] = self.requests.requests
            out.update(self.requests.stats)
        if self.proxy is not None:
            out["proxy_connections"] = self.proxy.stats.connections
            out["proxy_requests"] = self.proxy.stats.requests
            out["proxy_upstream_errors"] = self.proxy.stats.upstream_errors
            out["proxy_upstream_timeouts"] = self.proxy.stats.upstream_timeouts
            out["proxy_upstream_connections"] = self.proxy.stats.upstream_connections
            out["proxy_client_aborts"] = self.proxy.stats.client_aborts
            out["proxy_client_timeouts"] = self.proxy.stats.client_timeouts
            out["proxy_retries"] = self.proxy.stats.retries
            out.update({f"proxy_refused_{k}": v for k, v in self.proxy.stats.refused.items()})
        if self.datagrams is not None:
            out["datagrams"] = self.datagrams.datagrams
            out["datagram_lines_malformed"] = self.datagrams.malformed
        out["samples"] = self.instance.samples
        out["sampler_errors"] = self.instance.errors
        if self.file_sink is not None:
            out["file_records_written"] = self.file_sink.written
            out["file_records_dropped"] = self.file_sink.dropped
        if self.intake is not None:
            out["child_output_bytes"] = self.intake.received_bytes
            out["child_output_dropped_bytes"] = self.intake.dropped_bytes
        return out

    def series(self) -> list[prometheus.Series]:
        """Self-telemetry for Prometheus, with labels."""
        out = [prometheus.Series(f"aws_{what}", {"api": api, **({"outcome": detail} if what ==
                                 "calls" else {"kind": detail} if detail else {})}, float(v))
               for (what, api, detail), v in self.caller.stats.items()]
        for sink, outbox in (("logs", self.logs.outbox), ("metrics", self.metrics.outbox)):
            out.append(prometheus.Series("buffer_bytes", {"sink": sink}, outbox.memory_bytes, True))
            out.append(prometheus.Series("spool_bytes", {"sink": sink}, outbox.spool_bytes, True))
            out.append(prometheus.Series("pending_items", {"sink": sink}, outbox.pending_items,
                                         True))
            for reason, count in outbox.stats.dropped.items():
                out.append(prometheus.Series("dropped", {"sink": sink, "reason": reason}, count))
        out.append(prometheus.Series("dropped", {"sink": "logs", "reason": "rejected"},
                                     self.logs.stats["events_dropped_rejected"]))
        out.append(prometheus.Series("dropped", {"sink": "logs", "reason": "invalid"},
                                     self.logs.stats["events_dropped_invalid"]))
        out.append(prometheus.Series("dropped", {"sink": "metrics", "reason": "invalid"},
                                     self.metrics.stats["datums_dropped_invalid"]))
        out.append(prometheus.Series("dropped", {"sink": "metrics", "reason": "nonfinite"},
                                     self.metrics.stats["datums_dropped_nonfinite"]))
        batches = self.logs.stats["batches_sent"]
        if batches:
            fill = self.logs.stats["bytes_sent"] / (batches * LOG_BATCH_MAX_BYTES)
            out.append(prometheus.Series("log_batch_fill_ratio", {}, fill, True))
        return out


class InstanceMetrics:
    """Samples the system and GPUs, feeds the aggregator and the Prometheus view.

    Args:
        settings: for intervals, disk path and namespaces.
        identity: for dimensions.
        cgroups: the cgroup reader (tests pass a fake tree).
    """

    def __init__(self, settings: Settings, identity: Identity, cgroups: CgroupReader | None = None,
                 gpu: GpuSampler | None = None) -> None:
        self.settings = settings
        self.aggregator = Aggregator(settings.interval)
        self.latest = prometheus.LatestReadings()
        self.system = SystemSampler(cgroups or CgroupReader(),
                                    settings.disk_path or default_disk_path())
        self.gpu = gpu
        self.samples = 0
        self.errors = 0
        namespace = naming.instance_namespace(settings.namespace, settings.resource)
        host_dims = naming.instance_dimension_sets(identity)
        self._dims = {"host": host_dims[0], "container": host_dims[1] if len(host_dims) > 1 else None}
        self._namespace = namespace
        self._disk = settings.resource is not Resource.TRANSFORM  # not for transform jobs

    async def run(self) -> None:
        """Sample every `sample_interval` seconds until cancelled."""
        if self.gpu is None:
            self.gpu = await asyncio.to_thread(GpuSampler)
        while True:
            await self.sample_once()
            await asyncio.sleep(self.settings.sample_interval)

    async def sample_once(self) -> None:
        """One sample of everything; a failure is logged and counted, never raised."""
        try:
            system = await asyncio.to_thread(self.system.sample)
            gpus = await asyncio.to_thread(self.gpu.sample) if self.gpu else []
        except Exception as exc:  # noqa: BLE001 - a sampler must never stop the agent
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                _log.error("sample_failed", error=repr(exc), errors=self.errors)
            return
        self.samples += 1
        self.latest.system, self.latest.gpus = system, gpus
        for figure in instance_figures(system, gpus, disk=self._disk):
            dims = self._dims[figure.view]
            if dims is not None:
                key = MetricKey(self._namespace, figure.metric, dims, "Percent")
                self.aggregator.add(key, figure.value, system.timestamp)


class RequestMetrics:
    """Requests (proxy, hooks) and StatsD samples -> the aggregator and Prometheus.

    Args:
        settings: for the namespace and the instance count.
        identity: for dimensions.
        aggregator: shared with the instance metrics (one publish per interval).
        instruments: Prometheus counters and histograms, or None.
        proxy_on: the proxy counts requests; hook-reported requests are then ignored
            (counting both would double every figure).
    """

    MAX_CUSTOM_SERIES = 1000

    def __init__(self, settings: Settings, identity: Identity, aggregator: Aggregator,
                 instruments: prometheus.RequestInstruments | None, *, proxy_on: bool) -> None:
        self._aggregator = aggregator
        self._instruments = instruments
        self._instances = settings.instance_count
        self._namespace = naming.invocation_namespace(settings.namespace)
        self._interval = settings.interval
        self._tallies: dict[int, RequestTally] = {}
        units = {m: "Microseconds" if m in LATENCIES else "None" for m in INVOCATION_METRICS}
        self._keys = {m: [MetricKey(self._namespace, m, dims, units[m])
                          for dims in naming.invocation_dimension_sets(identity, m)]
                      for m in INVOCATION_METRICS}
        self._custom_base: Dimensions = (
            naming.variant_dimensions(identity) if identity.resource is Resource.ENDPOINT
            else (("Host", naming.host_dimension(identity)),))
        self._custom: set[tuple[str, Dimensions]] = set()
        self._proxy_on = proxy_on
        self.requests = 0
        self.stats = {"hook_requests_ignored": 0, "custom_series_folded": 0,
                      "statsd_samples": 0, "statsd_invalid_invocations": 0}

    def on_record(self, record: RequestRecord) -> None:
        """One /invocations request."""
        self.requests += 1
        now = time.time()
        start = int(now // self._interval) * self._interval
        tally = self._tallies.get(start)
        if tally is None:
            tally = self._tallies[start] = RequestTally()
        tally.add(record.status, record.model_us, record.container_us)
        if self._instruments is not None:
            self._instruments.observe(record)

    def on_records(self, records: list[RequestRecord]) -> None:
        """Requests from a hook's compact tally (one datagram, one interval)."""
        if self._proxy_on:
            self.stats["hook_requests_ignored"] += len(records)
            return
        self.requests += len(records)
        now = time.time()
        start = int(now // self._interval) * self._interval
        tally = self._tallies.get(start)
        if tally is None:
            tally = self._tallies[start] = RequestTally()
        add, instruments = tally.add, self._instruments
        for record in records:
            add(record.status, record.model_us, record.container_us)
            if instruments is not None:
                instruments.observe(record)

    def flush(self) -> None:
        """Move the tallied requests into the aggregator (before it closes intervals)."""
        tallies, self._tallies = self._tallies, {}
        for start, tally in tallies.items():
            self._aggregator.merge(start, [
                (key, counted, metric in LATENCIES)
                for metric, counted in invocation_counts(tally, self._instances)
                for key in self._keys[metric]])

    def on_samples(self, samples: list[Sample]) -> None:
        """StatsD samples from UDP or the hook socket."""
        self.stats["statsd_samples"] += len(samples)
        now = time.time()
        for sample in samples:
            if sample.name == INVOCATION:
                record = invocation_record(sample)
                if record is None:
                    self.stats["statsd_invalid_invocations"] += 1
                elif self._proxy_on:
                    self.stats["hook_requests_ignored"] += 1
                else:
                    self.on_record(record)
            elif sample.name in self._keys:
                latency = sample.name in LATENCIES
                scale = 1000.0 if latency and sample.unit == "Milliseconds" else 1.0
                value = sample.value * scale if latency else sample.value / sample.rate
                for key in self._keys[sample.name]:
                    self._aggregator.add(key, value, now, distribution=latency)
            else:
                self._custom_metric(sample, now)

    def _custom_metric(self, sample: Sample, now: float) -> None:
        dims: Dimensions = self._custom_base + sample.tags
        if (sample.name, dims) not in self._custom:
            if len(self._custom) >= self.MAX_CUSTOM_SERIES:
                self.stats["custom_series_folded"] += 1  # bounded cost: fold into one series
                dims = (*self._custom_base, ("Overflow", "true"))
            else:
                self._custom.add((sample.name, dims))
        value = sample.value / sample.rate if sample.kind == "c" else sample.value
        key = MetricKey(self._namespace, sample.name, dims, sample.unit)
        self._aggregator.add(key, value, now, distribution=sample.kind == "d")


async def publish_loop(instance: InstanceMetrics, sink: CloudWatchMetricsSink, jitter: float,
                       requests: RequestMetrics | None = None) -> None:
    """Publish each interval when it closes, `jitter` seconds later (spreads a fleet)."""
    aggregator = instance.aggregator
    aggregator.close(time.time())
    while True:
        due = aggregator.next_close_at(time.time()) + jitter
        await asyncio.sleep(max(0.0, due - time.time()))
        if requests is not None:
            requests.flush()
        closed = aggregator.close(time.time() - jitter)
        if closed:
            sink.submit(closed)


def build_pipeline(settings: Settings, identity: Identity) -> Pipeline:
    """Create the sinks and start their tasks."""
    file_sink = FileSink(settings.file_sink) if settings.file_sink else None
    caller = AwsCaller(send=settings.cloudwatch_enabled, file_sink=file_sink, region=settings.region,
                       timeout=settings.aws_timeout)
    if settings.cloudwatch_enabled:
        threading.Thread(target=caller.warm_up, name="aws-warm-up", daemon=True).start()
    group = naming.log_group(identity, settings.log_group)
    stream = naming.log_stream(identity, settings.log_stream)
    memory, spool_bytes = int(settings.buffer_mb * MIB), int(settings.spool_mb * MIB)
    spool = settings.spool_dir
    # Logs get 15/16 of each bound; metrics, a few KB a minute, the rest.
    logs = CloudWatchLogsSink(
        caller, group, stream,
        max_bytes=memory - memory // 16,
        spool=spool / naming.spool_folder(group, stream) if spool else None,
        spool_max_bytes=spool_bytes - spool_bytes // 16,
        retention_days=settings.log_retention_days,
    )
    metrics = CloudWatchMetricsSink(caller, high_resolution=settings.high_resolution,
                                    max_bytes=max(memory // 16, MIB),
                                    spool=spool / "metrics" if spool else None,
                                    spool_max_bytes=max(spool_bytes // 16, MIB))
    instance = InstanceMetrics(settings, identity)
    pipeline = Pipeline(file_sink, caller, logs, metrics, instance, [])
    instance.latest.series = pipeline.series
    instance.latest.counters = lambda: {k: float(v) for k, v in pipeline.stats().items()
                                        if not k.endswith("_unsent")}  # gauges, in series()
    pipeline.registry = prometheus.registry_for(instance.latest)
    pipeline.requests = RequestMetrics(settings, identity, instance.aggregator,
                                       prometheus.RequestInstruments(pipeline.registry),
                                       proxy_on=settings.proxy_listen is not None)
    if settings.prometheus is not None:
        try:
            prometheus.serve(pipeline.registry, settings.prometheus.host, settings.prometheus.port)
            _log.info("prometheus_started", address=str(settings.prometheus))
        except OSError as exc:
            _log.error("prometheus_unavailable", address=str(settings.prometheus), error=str(exc),
                       hint="set TELEMETRY_PROMETHEUS to a free host:port, or off")
    jitter = random.uniform(0, min(settings.interval * 0.25, 15.0))  # noqa: S311 - not crypto
    pipeline.tasks = [
        asyncio.create_task(instance.run(), name="instance_metrics"),
        asyncio.create_task(publish_loop(instance, metrics, jitter, pipeline.requests), name="publish_metrics"),
    ]
    pipeline.senders = [
        asyncio.create_task(logs.run(), name="cloudwatch_logs"),
        asyncio.create_task(metrics.run(), name="cloudwatch_metrics"),
    ]
    return pipeline


async def shutdown(pipeline: Pipeline, deadline: float) -> None:
    """Flush every sink before `deadline` (monotonic); spool or count what is left."""
    if pipeline.proxy is not None:
        await pipeline.proxy.close()
    for transport in pipeline.listeners:
        drain(transport)  # a hook's exit flush may still wait in the queue
        transport.close()
    if pipeline.hook_socket is not None:
        pipeline.hook_socket.unlink(missing_ok=True)
    for task in pipeline.tasks:
        task.cancel()
    await asyncio.gather(*pipeline.tasks, return_exceptions=True)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await pipeline.instance.sample_once()
    except TimeoutError:
        pass
    if pipeline.requests is not None:
        pipeline.requests.flush()
    pipeline.metrics.submit(pipeline.instance.aggregator.close(time.time(), force=True))
    for sender in (pipeline.logs, pipeline.metrics):
        sender.close(deadline)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await asyncio.gather(*pipeline.senders)
    except TimeoutError:
        for task in pipeline.senders:
            task.cancel()
        await asyncio.gather(*pipeline.senders, return_exceptions=True)
    kept = {"log_events_kept_in_spool": pipeline.logs.outbox.persist(),
            "metric_requests_kept_in_spool": pipeline.metrics.outbox.persist()}
    if pipeline.file_sink is not None:
        await pipeline.file_sink.aclose(max(0.5, deadline - time.monotonic()))
    stats = pipeline.stats() | kept
    lost = {k: v for k, v in stats.items()
            if v and ("dropped" in k or k.endswith("_unsent")) and not _kept(k, stats)}
    (_log.warning if lost else _log.info)("agent_stopped", **stats)


def _kept(key: str, stats: Mapping[str, int]) -> bool:
    """Unsent items that wait in the spool for the next start are not lost."""
    prefix = key.removesuffix("_unsent")
    return key.endswith("_unsent") and stats.get(f"{prefix}_kept_in_spool", 0) >= stats[key]


async def start_listeners(pipeline: Pipeline, settings: Settings, env: Mapping[str, str]) -> None:
    """The hook socket, the StatsD listener and the request proxy. A failure is logged and
    that listener stays off: the child runs regardless."""
    requests = pipeline.requests
    assert requests is not None
    intake = pipeline.datagrams = DatagramIntake(requests.on_samples, requests.on_records)
    hook = settings.hook_socket or Path(tempfile.mkdtemp(prefix="telemetry-agent-")) / "hooks.sock"
    try:
        pipeline.listeners.append(await listen_unix(intake, hook))
        pipeline.hook_socket = hook
    except OSError as exc:
        _log.error("hook_socket_unavailable", path=str(hook), error=str(exc))
    if settings.statsd is not None:
        try:
            pipeline.listeners.append(await listen_udp(intake, settings.statsd.host,
                                                       settings.statsd.port))
        except OSError as exc:
            _log.error("statsd_unavailable", address=str(settings.statsd), error=str(exc),
                       hint="set TELEMETRY_STATSD to a free host:port, or off")
    if settings.proxy_listen is not None and settings.proxy_upstream is not None:
        host, port = proxy_front(settings, env)
        upstream = settings.proxy_upstream
        registry = pipeline.registry
        page = (lambda: prometheus.page(registry)) if settings.proxy_metrics and registry else None
        timeouts = ProxyTimeouts(
            client_header=settings.proxy_client_header_timeout,
            client_body=settings.proxy_client_body_timeout, send=settings.proxy_send_timeout,
            keepalive=settings.proxy_keepalive_timeout, connect=settings.proxy_connect_timeout,
            read=settings.proxy_timeout)
        proxy = RequestProxy((upstream.host, upstream.port), requests.on_record,
                             timeouts=timeouts, metrics_page=page)
        try:
            await proxy.start(host, port)
            pipeline.proxy = proxy
            _log.info("proxy_started", listen=f"{host}:{port}", upstream=str(upstream))
        except OSError as exc:
            _log.error("proxy_unavailable", listen=f"{host}:{port}", error=str(exc))


def proxy_front(settings: Settings, env: Mapping[str, str]) -> tuple[str, int]:
    """Where the proxy listens. `auto`: all interfaces (SageMaker calls the container from
    outside) on the port SageMaker gave, `SAGEMAKER_BIND_TO_PORT`, or 8080."""
    listen = settings.proxy_listen
    assert listen is not None
    if listen.host != "auto":
        return listen.host, listen.port
    try:
        return "0.0.0.0", int(env.get("SAGEMAKER_BIND_TO_PORT", "8080"))  # noqa: S104
    except ValueError:
        return "0.0.0.0", 8080  # noqa: S104


def child_environment(settings: Settings, env: Mapping[str, str],
                      hook_socket: Path | None = None) -> dict[str, str]:
    """The child's environment: the agent's, plus where the hooks find the agent and, with
    the proxy in front, the port the model server should move to."""
    child = dict(env)
    if hook_socket is not None:
        child["TELEMETRY_HOOK_SOCKET"] = str(hook_socket)
    if settings.proxy_listen is not None and settings.proxy_upstream is not None:
        child["SAGEMAKER_BIND_TO_PORT"] = str(settings.proxy_upstream.port)
    return child


async def run(settings: Settings, identity: Identity, argv: Sequence[str],
              env: Mapping[str, str]) -> int:
    """Run the agent (around `argv` when given); return the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in FORWARDED:  # until the child runs, a stop signal just stops the agent
        loop.add_signal_handler(sig, stop.set)
    pipeline = build_pipeline(settings, identity)
    await start_listeners(pipeline, settings, env)
    _log.info("agent_started", log_group=pipeline.logs.group, log_stream=pipeline.logs.stream,
              cloudwatch=settings.cloudwatch_enabled, child=list(argv))
    if not argv:
        await stop.wait()
        code = 0
    else:
        code = await _run_child(settings, pipeline, argv, env)
    await shutdown(pipeline, time.monotonic() + settings.shutdown_timeout)
    return code


async def _run_child(settings: Settings, pipeline: Pipeline, argv: Sequence[str],
                     env: Mapping[str, str]) -> int:
    supervisor = Supervisor(argv, child_environment(settings, env, pipeline.hook_socket),
                            settings.stop_grace)
    intake = pipeline.intake = Intake(asyncio.get_running_loop())
    source = ChildOutputSource(intake, start_pattern=settings.log_start_pattern)
    try:
        out_fd, err_fd = supervisor.start()
    except FileNotFoundError:
        _log.error("child_not_found", argv=list(argv))
        return EXIT_NOT_FOUND
    except PermissionError:
        _log.error("child_not_executable", argv=list(argv))
        return EXIT_NOT_EXECUTABLE
    for fd, name, writer in ((out_fd, "stdout", STDOUT), (err_fd, "stderr", STDERR)):
        threading.Thread(target=relay, args=(fd, name, writer, intake), daemon=True,
                         name=f"relay-{name}").start()
    source_task = asyncio.create_task(source.run(pipeline.logs.submit, pipeline.logs.saturated), name="child_output")
    code = await supervisor.wait()
    try:
        async with asyncio.timeout(PIPE_DRAIN_S):
            await source.finished.wait()
    except TimeoutError:
        _log.warning("child_pipes_still_open", reason="a descendant holds them", waited_s=PIPE_DRAIN_S)
    source_task.cancel()
    await asyncio.gather(source_task, return_exceptions=True)
    source.drain(pipeline.logs.submit)
    return code


def hard_exit(code: int) -> None:
    """Leave now: worker threads blocked on a stuck sink must not hold the exit."""
    os._exit(code)
