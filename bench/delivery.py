"""Delivery through boto3 to a local moto server, against a packed boto3 loop in the same run.

Target: lines/s delivered through boto3 to a local moto ≥ a packed boto3 loop
(the best a hand-written shipper can do: batches pre-built to the limits, sent
back to back); log batches ≥ 90 % of 1 MiB under load; PutMetricData calls per
interval = ceil(datums / 1000) within 1 MB.
Run: python -m bench.delivery [--lines N]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from datetime import UTC, datetime

from agent.aggregation.aggregator import Aggregator, MetricKey
from agent.model import LogEvent
from agent.rules.batching import LOG_BATCH_MAX_BYTES, log_batch_params, take_log_batch
from agent.rules.metric_data import datums, request_size, split_metric_data
from bench.common import AGENT, bench_env, table, tmpdir
from tests.cloud import REGION, MotoServer

CHILD = ("import os, sys\nn = int(sys.argv[1])\nw = os.write\n"
         "for i in range(n):\n    w(1, b'%09d ' % i + b'x' * 89 + b'\\n')\n")


def packed_boto3_loop(moto: MotoServer, lines: int) -> float:
    """Seconds for boto3 alone to send `lines` 100 B lines in full batches."""
    logs = moto.client("logs")
    logs.create_log_group(logGroupName="baseline")
    logs.create_log_stream(logGroupName="baseline", logStreamName="s")
    now = int(time.time() * 1000)
    events = [LogEvent(now, "%09d " % i + "x" * 89, "stdout", 99) for i in range(lines)]
    started = time.perf_counter()
    while events:
        count = take_log_batch(events)
        logs.put_log_events(**log_batch_params("baseline", "s", events[:count]))
        del events[:count]
    return time.perf_counter() - started


def agent_run(moto: MotoServer, lines: int) -> tuple[float, dict[str, int], int]:
    """Seconds from start to exit of the agent around a child printing `lines` lines."""
    tmp = tmpdir()
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = bench_env(tmp, TELEMETRY_CLOUDWATCH="on", AWS_REGION=REGION,
                    AWS_ENDPOINT_URL=moto.url, TELEMETRY_LOG_LEVEL="info",
                    TELEMETRY_BUFFER_MB="256")
    started = time.perf_counter()
    done = subprocess.run([*AGENT, sys.executable, str(script), str(lines)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    wall = time.perf_counter() - started
    stats = next(json.loads(line) for line in done.stderr.splitlines()
                 if b'"agent_stopped"' in line)
    stored = 0
    logs = moto.client("logs")
    token = None
    while True:
        kwargs = {"logGroupName": "/aws/sagemaker/Endpoints/bench",
                  "logStreamName": "AllTraffic/bench-host", "startFromHead": True}
        if token:
            kwargs["nextToken"] = token
        page = logs.get_log_events(**kwargs)
        stored += len(page["events"])
        if not page["events"] or page["nextForwardToken"] == token:
            break
        token = page["nextForwardToken"]
    return wall, stats, stored


def metric_economy(metrics: int) -> tuple[int, int, float]:
    """(PutMetricData requests, the fewest the limits allow, mean request fill of 1 MB) for
    one interval of `metrics` latency series with 150-value distributions. The fewest is
    max(ceil(datums / 1000), ceil(bytes / 1 MB)): these datums are ~2.7 KB each, so bytes bind."""
    agg = Aggregator(60)
    for m in range(metrics):
        key = MetricKey("Bench", "ModelLatency", (("EndpointName", "e"), ("VariantName", f"v{m}")),
                        "Microseconds")
        for v in range(150):
            agg.add(key, float(v * 37 + m), 0.0, distribution=True)
    closed = agg.close(60.0)
    items = datums(closed[0], high_resolution=False)["Bench"]
    requests = split_metric_data("Bench", items)
    total = sum(request_size({"Namespace": "Bench", "MetricData": r}) for r in requests)
    fewest = max(math.ceil(len(items) / 1000), math.ceil(total / 1_000_000))
    return len(requests), fewest, total / (len(requests) * 1_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    moto = MotoServer()
    try:
        base = packed_boto3_loop(moto, args.lines)
        wall, stats, stored = agent_run(moto, args.lines)
    finally:
        moto.stop()
    fill = stats["log_bytes_sent"] / (stats["log_batches_sent"] * LOG_BATCH_MAX_BYTES)
    calls, ideal, pmd_fill = metric_economy(2000)
    small_calls, small_ideal, _ = metric_economy(900)
    agent_rate, base_rate = args.lines / wall, args.lines / base
    print(f"{args.lines} lines of 100 B; {stored} stored by moto; "
          f"{stats['log_batches_sent']} PutLogEvents calls ({datetime.now(UTC):%Y-%m-%d})")
    print(table([
        ("lines/s delivered to moto (agent start to exit)", f"{agent_rate:,.0f}",
         "≥ packed boto3 loop", f"{base_rate:,.0f}", f"{agent_rate / base_rate:.2f}×"),
        ("mean PutLogEvents batch fill", f"{fill:.1%}", "≥ 90 %", "—", "—"),
        ("PutMetricData calls, 2000 series × 150 values", str(calls), "the fewest the limits allow",
         str(ideal), f"{calls / ideal:.2f}×"),
        ("PutMetricData calls, 900 series × 150 values", str(small_calls),
         "the fewest the limits allow", str(small_ideal), f"{small_calls / small_ideal:.2f}×"),
        ("mean PutMetricData body fill of 1 MB", f"{pmd_fill:.1%}", "—", "—", "—"),
    ]))


if __name__ == "__main__":
    main()
