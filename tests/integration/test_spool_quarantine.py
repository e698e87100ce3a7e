"""A poisoned spool: the agent starts over segments a previous run left, one of them bad.

Before the spool verified itself, a segment of the wrong shape killed the sender task
for good (every later line stayed unsent and shutdown ended in a traceback) and stayed
on disk to do it again at every start.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.model import LogEvent
from agent.rules.batching import take_log_batch
from agent.rules.naming import spool_folder
from agent.sinks.cloudwatch_logs import LOG_CODEC
from agent.sinks.cloudwatch_metrics import METRIC_CODEC
from agent.sinks.outbox import Outbox
from tests.cloud import FaultProxy, MotoServer
from tests.conftest import agent_events
from tests.integration.conftest import GROUP, STREAM, RunningAgent, cloud_env, stored_messages

pytestmark = pytest.mark.timeout(120)


def leave_segments(spool: Path, outbox: Outbox[Any], batches: list[list[Any]]) -> list[Path]:
    """One segment per batch, oldest first, as an agent stopping during an outage does."""
    for batch in batches:
        outbox.put(batch)
        taken = outbox.take()
        assert taken is not None and taken.items == batch
    outbox.persist()
    paths = sorted(spool.glob("*.seg"))
    assert len(paths) == len(batches)
    return paths


def events(prefix: str, count: int, ago_s: int) -> list[LogEvent]:
    start = int(time.time() * 1000) - ago_s * 1000
    return [LogEvent(start + i, f"{prefix} {i:04d}", "stdout", len(f"{prefix} {i:04d}"))
            for i in range(count)]


def test_poisoned_segments_are_quarantined_and_the_good_ones_delivered_once(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy) -> None:
    """Good log segments around a wrong-shape one, and a metrics segment whose timestamp
    overflows: the good ones reach CloudWatch once, in order, before the new lines; the
    bad ones are in quarantine/, counted in `agent_stopped`."""
    spool = tmp_path / "spool"
    logs_dir, metrics_dir = spool / spool_folder(GROUP, STREAM), spool / "metrics"
    before, poisoned, after = events("before", 300, 60), events("x", 2, 50), events("after", 300, 40)
    logs = Outbox("logs", max_bytes=1 << 30, cost=lambda e: e.size, cut=take_log_batch,
                  codec=LOG_CODEC, spool=logs_dir, spool_max_bytes=1 << 30)
    bad_log = leave_segments(logs_dir, logs, [before, poisoned, after])[1]
    bad_log.write_bytes(b'[[1,"stdout",5]]')  # valid JSON, wrong shape: as the issue found it
    (logs_dir / "0000000000000001-5.tmp").write_bytes(b"a write a crash cut short")

    stamp = datetime.now(UTC).replace(microsecond=0)
    good = {"Namespace": "SpoolTest", "MetricData": [
        {"MetricName": "Restored", "Unit": "Count", "Timestamp": stamp, "Value": 7.0,
         "Dimensions": [{"Name": "Host", "Value": "spool"}]}]}
    metrics = Outbox("metrics", max_bytes=1 << 30, cost=lambda _: 100, cut=lambda _: 1,
                     codec=METRIC_CODEC, spool=metrics_dir, spool_max_bytes=1 << 30)
    bad_metric = leave_segments(metrics_dir, metrics, [[good], [good]])[0]
    bad_metric.write_bytes(b'[{"Namespace":"SpoolTest","MetricData":[{"MetricName":"Bad",'
                           b'"Unit":"Count","Timestamp":{"$t":1e20},"Value":1}]}]')

    env = cloud_env(tmp_path, proxy, TELEMETRY_SPOOL_DIR=str(spool), TELEMETRY_INTERVAL="1")
    code, _, err = RunningAgent(["echo", "fresh line"], env).wait(90)
    assert code == 0, err[-3000:]

    expected = [e.message for e in (*before, *after)] + ["fresh line"]
    assert stored_messages(moto) == expected
    found = moto.client("cloudwatch").list_metrics(Namespace="SpoolTest")["Metrics"]
    assert [m["MetricName"] for m in found] == ["Restored"]

    assert [p.name.split("-", 1)[1] for p in (logs_dir / "quarantine").iterdir()] == [
        bad_log.name]
    assert [p.name.split("-", 1)[1] for p in (metrics_dir / "quarantine").iterdir()] == [
        bad_metric.name]
    assert not list(spool.rglob("*.tmp")) and not list(logs_dir.glob("*.seg"))
    assert not list(metrics_dir.glob("*.seg"))
    report = next(e for e in agent_events(err) if e["event"] == "agent_stopped")
    assert sum(v for k, v in report.items() if k.endswith("quarantined_segments")) == 2
    assert sum(v for k, v in report.items() if k.endswith("_unsent")) == 0
    logged = [e for e in agent_events(err) if e["event"] == "spool_segment_quarantined"]
    assert len(logged) == 2
