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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.aggregate import Aggregator, MetricKey
from agent.config import Settings
from agent.log import get_logger
from agent.model import Identity, Resource
from agent.rules import naming
from agent.rules.instance_metrics import instance_figures
from agent.sinks import prometheus
from agent.sinks.aws import AwsCaller
from agent.sinks.cloudwatch_logs import CloudWatchLogsSink
from agent.sinks.cloudwatch_metrics import CloudWatchMetricsSink
from agent.sinks.file import FileSink
from agent.sources.child_output import ChildOutputSource, Intake, relay
from agent.sources.gpu import GpuSampler
from agent.sources.system import CgroupReader, SystemSampler, default_disk_path
from agent.stdio import STDERR, STDOUT
from agent.supervisor import FORWARDED, Supervisor

# After the child exits, how long its pipes may stay open (a grandchild holding them)
# before the agent stops reading and flushes what it has.
PIPE_DRAIN_S = 2.0
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126

_log = get_logger("app")


@dataclass(slots=True)
class Pipeline:
    """The running parts, for shutdown and self-telemetry."""

    file_sink: FileSink | None
    logs: CloudWatchLogsSink
    metrics: CloudWatchMetricsSink
    instance: InstanceMetrics
    tasks: list[asyncio.Task[None]]
    intake: Intake | None = None

    def stats(self) -> dict[str, int]:
        """Every counter, for the last log line and self-telemetry."""
        out = {f"log_{k}": v for k, v in self.logs.stats.items()}
        out.update({f"metric_{k}": v for k, v in self.metrics.stats.items()})
        out["samples"] = self.instance.samples
        out["sampler_errors"] = self.instance.errors
        out["log_events_unsent"] = self.logs.pending_events
        if self.file_sink is not None:
            out["file_records_written"] = self.file_sink.written
            out["file_records_dropped"] = self.file_sink.dropped
        if self.intake is not None:
            out["child_output_bytes"] = self.intake.received_bytes
            out["child_output_dropped_bytes"] = self.intake.dropped_bytes
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


async def publish_loop(instance: InstanceMetrics, sink: CloudWatchMetricsSink, jitter: float) -> None:
    """Publish each interval when it closes, `jitter` seconds later (spreads a fleet)."""
    aggregator = instance.aggregator
    aggregator.close(time.time())
    while True:
        due = aggregator.next_close_at(time.time()) + jitter
        await asyncio.sleep(max(0.0, due - time.time()))
        closed = aggregator.close(time.time() - jitter)
        if closed:
            await sink.publish(closed)


def build_pipeline(settings: Settings, identity: Identity) -> Pipeline:
    """Create the sinks and start their tasks."""
    file_sink = FileSink(settings.file_sink) if settings.file_sink else None
    caller = AwsCaller(send=settings.cloudwatch_enabled, file_sink=file_sink, region=settings.region)
    logs = CloudWatchLogsSink(
        caller,
        naming.log_group(identity, settings.log_group),
        naming.log_stream(identity, settings.log_stream),
        max_bytes=int(settings.buffer_mb * (1 << 20)),
        retention_days=settings.log_retention_days,
    )
    metrics = CloudWatchMetricsSink(caller, high_resolution=settings.high_resolution)
    instance = InstanceMetrics(settings, identity)
    pipeline = Pipeline(file_sink, logs, metrics, instance, [])
    instance.latest.counters = lambda: {k: float(v) for k, v in pipeline.stats().items()}
    if settings.prometheus is not None:
        try:
            prometheus.serve(instance.latest, settings.prometheus.host, settings.prometheus.port)
            _log.info("prometheus_started", address=str(settings.prometheus))
        except OSError as exc:
            _log.error("prometheus_unavailable", address=str(settings.prometheus), error=str(exc),
                       hint="set TELEMETRY_PROMETHEUS to a free host:port, or off")
    jitter = random.uniform(0, min(settings.interval * 0.25, 15.0))  # noqa: S311 - not crypto
    pipeline.tasks = [
        asyncio.create_task(logs.run(), name="cloudwatch_logs"),
        asyncio.create_task(instance.run(), name="instance_metrics"),
        asyncio.create_task(publish_loop(instance, metrics, jitter), name="publish_metrics"),
    ]
    return pipeline


async def shutdown(pipeline: Pipeline, deadline: float) -> None:
    """Flush every sink before `deadline` (monotonic), then cancel what is left."""
    for task in pipeline.tasks:
        task.cancel()
    await asyncio.gather(*pipeline.tasks, return_exceptions=True)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await pipeline.instance.sample_once()
            closed = pipeline.instance.aggregator.close(time.time(), force=True)
            await asyncio.gather(pipeline.logs.flush(), pipeline.metrics.publish(closed))
    except TimeoutError:
        pass
    if pipeline.file_sink is not None:
        await pipeline.file_sink.aclose(max(0.5, deadline - time.monotonic()))
    stats = pipeline.stats()
    lost = {k: v for k, v in stats.items() if v and ("dropped" in k or "unsent" in k)}
    (_log.warning if lost else _log.info)("agent_stopped", **stats)


def child_environment(settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: the agent's, plus what the hooks need to find the agent."""
    child = dict(env)
    if settings.hook_socket is not None:
        child["TELEMETRY_HOOK_SOCKET"] = str(settings.hook_socket)
    return child


async def run(settings: Settings, identity: Identity, argv: Sequence[str],
              env: Mapping[str, str]) -> int:
    """Run the agent (around `argv` when given); return the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in FORWARDED:  # until the child runs, a stop signal just stops the agent
        loop.add_signal_handler(sig, stop.set)
    pipeline = build_pipeline(settings, identity)
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
    supervisor = Supervisor(argv, child_environment(settings, env), settings.stop_grace)
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
    source_task = asyncio.create_task(source.run(pipeline.logs.submit), name="child_output")
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
