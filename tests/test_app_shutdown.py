"""Shutdown always ends with `agent_stopped` and every counter, whatever part fails.

The real pipeline (dry run, file sink, hook socket) with one sink and one source
added that fail the way a bug would: `stop` raises, `counters` raises.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import structlog

from agent.app import build_pipeline, shutdown, start
from agent.config import load_settings
from agent.identity import resolve_identity
from agent.model import LogEvent
from tests.conftest import base_env

pytestmark = pytest.mark.timeout(60)


class BrokenSink:
    name = "broken"

    def start(self) -> None:
        """Starts fine."""

    async def stop(self, deadline: float) -> None:
        raise RuntimeError("flush failed in a way nobody foresaw")

    def counters(self) -> dict[str, int]:
        raise KeyError("a counter that is not there")


class BrokenSource:
    name = "broken_source"

    async def start(self) -> None:
        """Starts fine."""

    async def stop(self, deadline: float) -> None:
        raise OSError("device vanished")

    def counters(self) -> dict[str, int]:
        return {"broken_source_reads": 4}


def test_failing_stop_and_counters_still_flush_the_rest_and_write_agent_stopped(
        tmp_path: Path) -> None:
    """A sink and a source whose `stop` raise, one whose `counters` raises: the other
    sinks still flush (the event reaches the file sink's record of PutLogEvents), each
    failure is logged and counted, and `agent_stopped` carries every other counter.
    Before, the first exception ended shutdown: no flush after it, no `agent_stopped`."""
    env = base_env(tmp_path)
    settings = load_settings(env)
    pipeline = build_pipeline(settings, resolve_identity(settings, env), env)
    pipeline.sinks.insert(0, BrokenSink())
    pipeline.sources.insert(0, BrokenSource())

    async def scenario() -> None:
        await start(pipeline, settings)
        pipeline.logs.submit([LogEvent(int(time.time() * 1000), "last words", "stdout", 10)])
        await shutdown(pipeline, time.monotonic() + 5)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    stopped = [e for e in logs if e["event"] == "agent_stopped"]
    assert len(stopped) == 1, [e["event"] for e in logs]
    counters = stopped[0]
    assert counters["task_failures_stop_broken"] == 1
    assert counters["task_failures_stop_broken_source"] == 1
    assert counters["task_failures_counters_broken"] == 1
    assert counters["broken_source_reads"] == 4 and counters["log_events_sent"] == 1
    assert {e["event"] for e in logs} >= {"step_failed", "counters_failed"}
    records = [json.loads(line) for line in settings.file_sink.read_text().splitlines()]
    sent = [r for r in records if r["api"] == "PutLogEvents"]
    assert [e["message"] for r in sent for e in r["params"]["logEvents"]] == ["last words"]
