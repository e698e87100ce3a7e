"""The composition root: builds the three stages from `Settings`, wires them, runs them.

    sources/      child output, proxy, hook socket + StatsD, instance sampler
       | callbacks (agent.model values)
    aggregation/  RequestMetrics, InstanceFigures -> Aggregator -> Publisher
       | ClosedInterval, LogEvent
    sinks/        CloudWatch metrics and logs, Prometheus, file

Start order: sinks, sources, then the child. Stop order (when the child exits,
or on SIGTERM with no child): the child's pipes drain, sources stop, the last
interval is published, the sinks flush within `shutdown_timeout`, and the
agent returns the child's exit code. Only this module sees every stage.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.aggregation.aggregator import Aggregator
from agent.aggregation.instance import InstanceFigures
from agent.aggregation.publisher import Publisher
from agent.aggregation.requests import RequestMetrics
from agent.config import Settings
from agent.log import get_logger
from agent.model import Identity
from agent.rules import naming
from agent.sinks import Sink
from agent.sinks.aws import AwsCaller
from agent.sinks.cloudwatch_logs import CloudWatchLogsSink
from agent.sinks.cloudwatch_metrics import CloudWatchMetricsSink
from agent.sinks.file import FileSink
from agent.sinks.prometheus import PrometheusSink, Series
from agent.sources import Source
from agent.sources.child_output import ChildOutputSource, Intake
from agent.sources.instance import InstanceSampler
from agent.sources.proxy import ProxyTimeouts, RequestProxy
from agent.sources.statsd import DatagramIntake, StatsdSource
from agent.sources.system import CgroupReader, SystemSampler, default_disk_path
from agent.sources.upstream_metrics import MetricsPage
from agent.stdio import STDERR, STDOUT
from agent.supervisor import FORWARDED, Supervisor, spawn_exit_code
from agent.tasks import FAILURES, guarded, read_counters, supervise

# After the child exits, how long its pipes may stay open (a grandchild holding them)
# before the agent stops reading and flushes what it has.
PIPE_DRAIN_S = 2.0
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126
MIB = 1 << 20
# Counter names in `agent_stopped` and on Prometheus are prefixed by the part they come from.
PREFIXES = {"cloudwatch_logs": "log_", "cloudwatch_metrics": "metric_", "proxy": "proxy_",
            "file": "file_"}

_log = get_logger("app")


class Counted(Protocol):
    """Anything with self-telemetry: every source and sink, and the parts between."""

    def counters(self) -> Mapping[str, int]: ...


@dataclass(slots=True)
class Pipeline:
    """The running parts: sinks, aggregation and sources, each with its own `counters()`."""

    caller: AwsCaller
    logs: CloudWatchLogsSink
    metrics: CloudWatchMetricsSink
    prometheus: PrometheusSink
    requests: RequestMetrics
    publisher: Publisher
    instance: InstanceSampler
    statsd: StatsdSource
    sinks: list[Sink] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    others: list[Counted] = field(default_factory=list)  # more parts with counters
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def parts(self) -> Iterable[Counted]:
        return (*self.sinks, self.caller, self.requests, self.publisher, *self.sources,
                *self.others, FAILURES)

    def stats(self) -> dict[str, int]:
        """Every counter, flat, for the last log line (and Prometheus' `agent_*_total`)."""
        out: dict[str, int] = {}
        for part in self.parts():
            name = getattr(part, "name", "")
            out.update({PREFIXES.get(name, "") + k: v for k, v in read_counters(name, part).items()})
        return out

    def series(self) -> list[Series]:
        """Labelled self-telemetry for Prometheus."""
        return [*self.caller.series(), *self.logs.series(), *self.metrics.series()]


def build_pipeline(settings: Settings, identity: Identity, env: Mapping[str, str]) -> Pipeline:
    """Create every part and wire the callbacks; nothing runs yet."""
    file_sink = FileSink(settings.file_sink) if settings.file_sink else None
    caller = AwsCaller(send=settings.cloudwatch_enabled, file_sink=file_sink,
                       region=settings.region, timeout=settings.aws_timeout)
    group = naming.log_group(identity, settings.log_group)
    stream = naming.log_stream(identity, settings.log_stream)
    memory, spool_bytes, spool = (int(settings.buffer_mb * MIB), int(settings.spool_mb * MIB),
                                  settings.spool_dir)
    # Logs get 15/16 of each bound; metrics, a few KB a minute, the rest.
    logs = CloudWatchLogsSink(
        caller, group, stream, max_bytes=memory - memory // 16,
        spool=spool / naming.spool_folder(group, stream) if spool else None,
        spool_max_bytes=spool_bytes - spool_bytes // 16,
        retention_days=settings.log_retention_days)
    metrics = CloudWatchMetricsSink(caller, high_resolution=settings.high_resolution,
                                    max_bytes=max(memory // 16, MIB),
                                    spool=spool / "metrics" if spool else None,
                                    spool_max_bytes=max(spool_bytes // 16, MIB))
    address = settings.prometheus
    prom = PrometheusSink((address.host, address.port) if address else None)
    aggregator = Aggregator(settings.interval)
    requests = RequestMetrics(aggregator, identity, namespace=settings.namespace,
                              instance_count=settings.instance_count,
                              observers=[prom.requests.observe],
                              proxy_on=settings.proxy_listen is not None,
                              max_models=settings.max_models,
                              custom_series=settings.custom_series)
    jitter = random.uniform(0, min(settings.interval * 0.25, 15.0))  # noqa: S311 - not crypto
    system = SystemSampler(CgroupReader(), settings.disk_path or default_disk_path())
    figures = InstanceFigures(aggregator, identity, settings.namespace,
                              read_counters=system.counters)
    publisher = Publisher(aggregator, metrics.submit,
                          before_close=[requests.flush, figures.flush], jitter=jitter)
    instance = InstanceSampler(system, [figures.on_reading, prom.on_reading],
                               interval=settings.sample_interval, boundary=settings.interval)
    udp = settings.statsd
    statsd = StatsdSource(DatagramIntake(requests.on_samples, requests.on_records),
                          hook_socket=settings.hook_socket,
                          udp=(udp.host, udp.port) if udp else None)
    pipeline = Pipeline(caller, logs, metrics, prom, requests, publisher, instance, statsd,
                        sinks=[s for s in (logs, metrics, prom, file_sink) if s is not None],
                        sources=[statsd, instance], others=[figures, STDERR])
    prom.latest.series = pipeline.series
    prom.latest.counters = lambda: {k: float(v) for k, v in pipeline.stats().items()
                                    if not k.endswith("_unsent")}  # gauges, in series()
    if settings.proxy_listen is not None and settings.proxy_upstream is not None:
        upstream = settings.proxy_upstream
        page = (MetricsPage(prom.page, (upstream.host, upstream.port))
                if settings.proxy_metrics else None)
        if page is not None:
            pipeline.others.append(page)
        proxy = RequestProxy(
            proxy_front(settings, env), (upstream.host, upstream.port), requests.on_record,
            timeouts=ProxyTimeouts(
                client_header=settings.proxy_client_header_timeout,
                client_body=settings.proxy_client_body_timeout, send=settings.proxy_send_timeout,
                keepalive=settings.proxy_keepalive_timeout,
                connect=settings.proxy_connect_timeout, read=settings.proxy_timeout),
            metrics_page=page,
            on_concurrency=requests.on_concurrency)
        pipeline.sources.append(proxy)
        prom.requests.in_flight = lambda: proxy.in_flight
    return pipeline


async def start(pipeline: Pipeline, settings: Settings) -> None:
    """Sinks first, then sources. A part that cannot start is logged and stays off: the
    child runs regardless."""
    if settings.cloudwatch_enabled:
        threading.Thread(target=pipeline.caller.warm_up, name="aws-warm-up", daemon=True).start()
    for sink in pipeline.sinks:
        try:
            sink.start()
        except OSError as exc:
            _log.error(f"{sink.name}_unavailable", error=str(exc),
                       hint=f"set TELEMETRY_{sink.name.upper()} to a free host:port, or off")
    for source in list(pipeline.sources):
        try:
            await source.start()
        except OSError as exc:  # only the proxy raises: the other listeners log their own
            pipeline.sources.remove(source)
            _log.error(f"{source.name}_unavailable", error=str(exc))
        else:
            if isinstance(source, RequestProxy):
                _log.info("proxy_started", listen="%s:%d" % source.listen,
                          upstream="%s:%d" % source.upstream)
    pipeline.tasks.append(supervise("publisher", pipeline.publisher.run))


async def shutdown(pipeline: Pipeline, deadline: float) -> None:
    """Stop the sources, publish the last interval, flush every sink before `deadline`
    (monotonic); spool or count what is left, and say so in `agent_stopped`. A step that
    fails is logged and counted and the next runs: `agent_stopped` is always written."""
    for task in pipeline.tasks:
        task.cancel()
    await asyncio.gather(*pipeline.tasks, return_exceptions=True)
    for source in pipeline.sources:
        await guarded(f"stop_{source.name}", source.stop(deadline))
    await guarded("publish_last", _publish_last(pipeline.publisher))
    pipeline.caller.hurry()  # retries waiting out a long backoff try again now
    # The file sink records the other sinks' calls: it closes after they have flushed.
    recorders = [sink for sink in pipeline.sinks if isinstance(sink, FileSink)]
    await asyncio.gather(*(guarded(f"stop_{sink.name}", sink.stop(deadline))
                           for sink in pipeline.sinks if sink not in recorders))
    await asyncio.gather(*(guarded(f"stop_{sink.name}", sink.stop(deadline))
                           for sink in recorders))
    stats = pipeline.stats()
    lost = {k: v for k, v in stats.items()
            if v and ("dropped" in k or k.endswith("_unsent")) and not _kept(k, stats)}
    (_log.warning if lost else _log.info)("agent_stopped", **stats)


async def _publish_last(publisher: Publisher) -> None:
    publisher.publish(time.time(), force=True)


def _kept(key: str, stats: Mapping[str, int]) -> bool:
    """Unsent items that wait in the spool for the next start are not lost."""
    prefix = key.removesuffix("_unsent")
    return key.endswith("_unsent") and stats.get(f"{prefix}_kept_in_spool", 0) >= stats[key]


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
                      statsd: StatsdSource | None = None) -> dict[str, str]:
    """The child's environment: the agent's, plus where the hooks find the agent and, with
    the proxy in front, the port the model server should move to."""
    child = dict(env)
    if statsd is not None and statsd.hook_socket is not None:
        child["TELEMETRY_HOOK_SOCKET"] = str(statsd.hook_socket)
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
    pipeline = build_pipeline(settings, identity, env)
    await start(pipeline, settings)
    _log.info("agent_started", log_group=pipeline.logs.group, log_stream=pipeline.logs.stream,
              cloudwatch=settings.cloudwatch_enabled, child=list(argv))
    code = await _run_child(settings, pipeline, argv, env) if argv else 0
    if not argv:
        await stop.wait()
    await shutdown(pipeline, time.monotonic() + settings.shutdown_timeout)
    return code


async def _run_child(settings: Settings, pipeline: Pipeline, argv: Sequence[str],
                     env: Mapping[str, str]) -> int:
    supervisor = Supervisor(argv, child_environment(settings, env, pipeline.statsd),
                            settings.stop_grace)
    output = ChildOutputSource(Intake(asyncio.get_running_loop()),
                               start_pattern=settings.log_start_pattern,
                               emit=pipeline.logs.submit, saturated=pipeline.logs.saturated)
    try:
        out_fd, err_fd = supervisor.start()
    except OSError as exc:  # ENOENT: 127; EACCES, ENOEXEC (no #!) and the rest: 126
        code = spawn_exit_code(exc)
        _log.error("child_not_found" if code == EXIT_NOT_FOUND else "child_not_executable",
                   argv=list(argv), error=exc.strerror)
        return code
    pipeline.others.append(supervisor)
    output.follow(out_fd, "stdout", STDOUT)
    output.follow(err_fd, "stderr", STDERR)
    await output.start()
    pipeline.sources.insert(0, output)  # stops first: the child's last lines are flushed
    code = await supervisor.wait()
    await output.stop(time.monotonic() + PIPE_DRAIN_S)
    return code


def hard_exit(code: int) -> None:
    """Leave now: worker threads blocked on a stuck sink must not hold the exit."""
    os._exit(code)
