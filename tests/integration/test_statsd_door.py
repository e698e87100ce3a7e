"""StatsD cannot poison or flood the CloudWatch path: the agent as a process, real sockets.

The poison test sends every kind of value and name CloudWatch refuses in one
interval beside 100 proxied requests; the flood sends 1,000,000 distinct StatsD
names beside 1,000 requests. Both read the PutMetricData calls back from the file
sink and check them with an oracle written apart from the agent.
"""

from __future__ import annotations

import http.client
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import FaultProxy, MotoServer
from tests.cloudwatch_rules import call_problems
from tests.conftest import agent_events, read_calls
from tests.integration.conftest import RunningAgent, cloud_env
from tests.integration.test_requests import SERVER, VARIANT, Agent, invocation_datums

pytestmark = pytest.mark.timeout(180)


def is_custom(name: str) -> bool:
    """The custom metrics these tests send (and the overflow count)."""
    return name in ("ok", "CustomMetricsOverflow") or name.startswith("flood.")


def metric_calls(calls: Path) -> list[dict[str, Any]]:
    return [r["params"] for r in read_calls(calls) if r["api"] == "PutMetricData"]


def stopped(err: bytes) -> dict[str, Any]:
    return next(e for e in agent_events(err) if e["event"] == "agent_stopped")


def test_poison_values_and_names_cost_no_invocation(tmp_path: Path) -> None:
    """Every kind of value and name CloudWatch refuses, in one interval beside 100 requests:
    the 100 are published, no call breaks a rule, every bad figure is counted by reason."""
    port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port.bind(("127.0.0.1", 0))
    statsd = port.getsockname()
    port.close()
    agent = Agent(tmp_path, SERVER, TELEMETRY_STATSD=f"127.0.0.1:{statsd[1]}")
    for _ in range(100):
        assert agent.get("/invocations", "POST", b"[1]").status == 200
    poison = [
        b"big:1e300|ms",                        # value_too_large
        b"scaled:1e90|c|@0.0001",               # value_too_large once scaled by the rate
        b"grown:+1e300|g",                      # value_too_large (a gauge delta)
        b"tiny:1e-300|g",                       # value_too_small
        "latência:1|c".encode(),                # metric_name_charset
        "m:1|c|#régión:a".encode(),             # dimension_name_charset
        b"m:1|c|#k:a\tb",                       # dimension_value_charset
        b"m:1|c|#k: ,z:1",                      # dimension_value_charset (blank)
        b"m:1|c|#k:1,k:2",                      # dimension_duplicate
        b"m:1|c|#EndpointName:other",           # dimension_duplicate
        b"ModelLatency:1e300|ms",               # value_too_large, on SageMaker's keys (2)
        b"ModelLatency:5|c",                    # latency_not_timer
        b"sagemaker.invocation:1e300|ms",       # statsd_invalid_invocations
        b"nan:NaN|g\ninf:inf|ms\nctl\x07:1|c\n\xff\xfe:1|c\n" + b"n" * 256 + b":1|c",  # malformed
        b"ok:1|c|#k:v",                         # the one good custom line
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for line in poison:
            sock.sendto(line, statsd)
    _, err = agent.stop()  # the listener's queue is drained before the last publish
    calls = metric_calls(agent.calls)
    for params in calls:
        assert call_problems(params) == [], params["MetricData"][:3]
    datums = invocation_datums(agent.calls)
    assert datums[("Invocations", VARIANT)]["sum"] == 100
    assert datums[("ok", ("EndpointName", "VariantName", "k"))]["sum"] == 1
    for params in calls:  # custom metrics ride in calls of their own
        kinds = {is_custom(d["MetricName"]) for d in params["MetricData"]}
        assert len(kinds) == 1, params["MetricData"]
    report = stopped(err)
    assert report["datums_rejected_value_too_large"] == 5
    assert report["datums_rejected_value_too_small"] == 1
    assert report["datums_rejected_metric_name_charset"] == 1
    assert report["datums_rejected_dimension_name_charset"] == 1
    assert report["datums_rejected_dimension_value_charset"] == 2
    assert report["datums_rejected_dimension_duplicate"] == 2
    assert report["datums_rejected_latency_not_timer"] == 1
    assert report["datums_rejected"] == 13
    assert report["statsd_invalid_invocations"] == 1
    assert report["datagram_lines_malformed"] == 5
    assert report["metric_datums_dropped_invalid"] == report["metric_datums_dropped_unsendable"] == 0
    logged = {e["reason"] for e in agent_events(err) if e["event"] == "metric_datum_rejected"}
    assert {"value_too_large", "metric_name_charset", "dimension_duplicate"} <= logged


def _hwm_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


FLOOD_NAMES = 1_000_000
PER_DATAGRAM = 100
CAP = 1000
# A minimal model server that answers at once (the example server's unbuffered answers meet
# Nagle and delayed ACKs on a kept-alive connection: about 40 ms each).
FAST_SERVER = [sys.executable, "-c", """
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["SAGEMAKER_BIND_TO_PORT"])), Handler).serve_forever()
"""]


def test_flood_of_distinct_names_keeps_the_cap_memory_and_invocations(tmp_path: Path) -> None:
    """1,000,000 distinct StatsD names (100 a datagram, as fast as the hook socket takes them)
    beside 1,000 requests, 5 s intervals: Invocations exact, at most 1,000 + 1 custom names
    per interval, every sample accounted for, and at most 64 MB of memory added."""
    hook = tmp_path / "hook" / "agent.sock"
    agent = Agent(tmp_path, FAST_SERVER, TELEMETRY_HOOK_SOCKET=str(hook),
                  TELEMETRY_INTERVAL="5", TELEMETRY_SHUTDOWN_TIMEOUT="30")
    before = _hwm_kib(agent.proc.pid)
    started = time.monotonic()
    sent = threading.Event()

    def flood() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(str(hook))
            for first in range(0, FLOOD_NAMES, PER_DATAGRAM):
                sock.send("\n".join(f"flood.{i:07d}:1|c" for i in range(
                    first, first + PER_DATAGRAM)).encode())  # blocks while the agent is behind
        sent.set()

    sender = threading.Thread(target=flood)
    sender.start()
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    statuses = []
    for _ in range(1000):
        conn.request("POST", "/invocations", body=b"[1]")
        answer = conn.getresponse()
        answer.read()
        statuses.append(answer.status)
    conn.close()
    sender.join(timeout=120)
    assert sent.is_set() and statuses.count(200) == 1000
    flood_s = time.monotonic() - started
    added_mib = (_hwm_kib(agent.proc.pid) - before) / 1024
    _, err = agent.stop()
    report = stopped(err)

    datums = invocation_datums(agent.calls)
    assert datums[("Invocations", VARIANT)]["sum"] == 1000
    per_stamp: dict[str, set[str]] = defaultdict(set)
    total = 0.0
    for params in metric_calls(agent.calls):
        assert call_problems(params) == []
        for d in params["MetricData"]:
            if is_custom(d["MetricName"]):
                per_stamp[d["Timestamp"]].add(d["MetricName"])
                total += d["StatisticValues"]["Sum"]
    assert per_stamp and max(len(names) for names in per_stamp.values()) <= CAP + 1
    assert total == FLOOD_NAMES  # published + folded into CustomMetricsOverflow
    assert report["statsd_samples"] == FLOOD_NAMES
    assert report["custom_series_folded"] == FLOOD_NAMES - sum(
        len(n - {"CustomMetricsOverflow"}) for n in per_stamp.values())
    assert added_mib <= 64, f"{added_mib:.1f} MiB added"
    print(f"\nflood: {FLOOD_NAMES} names in {flood_s:.1f} s beside 1,000 requests; "
          f"{len(per_stamp)} intervals, ≤ {max(len(n) for n in per_stamp.values())} custom "
          f"names each; VmHWM {before / 1024:.1f} -> +{added_mib:.1f} MiB")


def test_a_call_refused_as_invalid_is_reported_as_a_bug(tmp_path: Path, moto: MotoServer,
                                                          proxy: FaultProxy) -> None:
    """The service answering PutMetricData with InvalidParameter is not a routine event:
    every datum passed the door, so the agent logs an error that asks for a bug report."""
    proxy.faults.invalid_api = "PutMetricData"
    env = cloud_env(tmp_path, proxy, TELEMETRY_SAMPLE_INTERVAL="0.2")
    code, _, err = RunningAgent([sys.executable, "-c", "import time; time.sleep(1)"], env).wait()
    assert code == 0
    refused = [e for e in agent_events(err) if e["event"] == "metric_request_refused"]
    assert refused and refused[0]["level"] == "error", agent_events(err)[-3:]
    assert "please report" in refused[0]["bug"] and "InvalidParameter" in refused[0]["code"]
    assert stopped(err)["metric_datums_dropped_invalid"] > 0
