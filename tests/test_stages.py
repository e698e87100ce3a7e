"""The pipeline's shape: every part implements its stage's protocol, and `agent_stopped`
holds every part's counters, none hiding another's."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent import app
from agent.config import load_settings
from agent.model import Identity, Resource
from agent.sinks import Sink
from agent.sources import Source
from tests.cloud import free_port

IDENTITY = Identity(resource=Resource.ENDPOINT, endpoint_name="ep", variant_name="AllTraffic",
                    container_name=None, job_name="", host="i-0", start_epoch=0)


def _pipeline(tmp_path: Path) -> app.Pipeline:
    env = {"TELEMETRY_FILE_SINK": str(tmp_path / "calls.jsonl"), "TELEMETRY_CLOUDWATCH": "false",
           "TELEMETRY_PROXY_LISTEN": f"127.0.0.1:{free_port()}", "TELEMETRY_PROXY_UPSTREAM": "127.0.0.1:9",
           "TELEMETRY_PROMETHEUS": "off", "TELEMETRY_STATSD": "off"}
    return app.build_pipeline(load_settings(env), IDENTITY, env)


def test_every_part_implements_its_stage_protocol(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    names = [part.name for part in (*pipeline.sources, *pipeline.sinks)]
    assert {"statsd", "instance", "proxy"} <= set(names)
    assert {"cloudwatch_logs", "cloudwatch_metrics", "prometheus", "file"} <= set(names)
    assert all(isinstance(source, Source) for source in pipeline.sources)
    assert all(isinstance(sink, Sink) for sink in pipeline.sinks)
    assert len(set(names)) == len(names)


def test_counters_of_different_parts_never_collide(tmp_path: Path) -> None:
    """`Pipeline.stats` is one flat dict: a counter named twice would hide the other."""
    pipeline = _pipeline(tmp_path)
    seen: dict[str, str] = {}
    for part in pipeline.parts():
        prefix = app.PREFIXES.get(getattr(part, "name", ""), "")
        for key in part.counters():
            full = prefix + key
            assert full not in seen, f"{full} from {part!r} and {seen[full]}"
            seen[full] = repr(part)
    assert set(seen) == set(pipeline.stats())


def test_stopped_parts_report_every_counter(tmp_path: Path) -> None:
    """A pipeline started and stopped at once still accounts for every part."""

    async def cycle() -> dict[str, int]:
        pipeline = _pipeline(tmp_path)
        settings = load_settings({"TELEMETRY_CLOUDWATCH": "false", "TELEMETRY_PROMETHEUS": "off"})
        await app.start(pipeline, settings)
        await app.shutdown(pipeline, asyncio.get_running_loop().time() + 5)
        return pipeline.stats()

    stats = asyncio.run(cycle())
    assert stats["samples"] >= 1 and stats["proxy_requests"] == 0
    assert "log_events_unsent" in stats and "metric_calls" in stats
