"""Concurrency, model errors, multi-model endpoints and streamed answers, against known truth.

A real agent process runs the test's own model server (`MODEL_SERVER`, a threaded
`http.server` that holds, streams, loads and unloads as told, and writes down when it
sent what); real HTTP clients call the proxy, and the figures are read back from the
PutMetricData calls the agent records in its file sink at shutdown.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import agent_events, read_calls
from tests.integration.test_requests import Agent

pytestmark = pytest.mark.timeout(120)

MODEL_SERVER = r'''
import json, os, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOG = sys.argv[1]
loaded = set()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"ok"):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(200)

    def do_DELETE(self):
        name = self.path.split("/")[2]
        with lock:
            ok = name in loaded
            loaded.discard(name)
        time.sleep(0.05)
        self.answer(200 if ok else 404)

    def do_POST(self):
        began = time.perf_counter()
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if url.path == "/models":
            name = json.loads(body)["model_name"]
            time.sleep(0.1)
            with lock:
                ok = name not in loaded
                loaded.add(name)
            return self.answer(200 if ok else 409)
        if url.path.startswith("/models/"):
            return self.answer(200 if url.path.split("/")[2] in loaded else 404)
        if "hold_ms" in query:
            time.sleep(int(query["hold_ms"][0]) / 1000)
            return self.answer(200)
        if "chunks" in query:
            sse = "sse" in query
            self.send_response(200)
            if sse:
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = []
            time.sleep(float(query["first_ms"][0]) / 1000)
            for i in range(int(query["chunks"][0])):
                if i:
                    time.sleep(float(query["gap_ms"][0]) / 1000)
                data = b"data: token %d\n\n" % i
                self.wfile.write(data if sse else b"%x\r\n%b\r\n" % (len(data), data))
                sent.append(time.perf_counter())
            if not sse:
                self.wfile.write(b"0\r\n\r\n")
            with open(LOG, "a") as log:
                log.write(json.dumps({"first": sent[0] - began,
                                      "gaps": [b - a for a, b in zip(sent, sent[1:])]}) + "\n")
            return
        self.answer(int(query.get("status", ["200"])[0]))


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(os.environ["SAGEMAKER_BIND_TO_PORT"])), Handler
                    ).serve_forever()
'''


def start(tmp_path: Path, **extra: str) -> Agent:
    script = tmp_path / "model_server.py"
    script.write_text(MODEL_SERVER)
    return Agent(tmp_path, [sys.executable, str(script), str(tmp_path / "sent.jsonl")], **extra)


Key = tuple[str, tuple[tuple[str, str], ...]]


def figures(calls: Path) -> dict[Key, dict[str, Any]]:
    """Merged statistics per (metric, dimensions) over every namespace: count, sum, min,
    max and the values of distributions."""
    out: dict[Key, dict[str, Any]] = defaultdict(lambda: {
        "count": 0.0, "sum": 0.0, "min": float("inf"), "max": float("-inf"), "values": []})
    for record in read_calls(calls):
        if record["api"] != "PutMetricData":
            continue
        for d in record["params"]["MetricData"]:
            entry = out[(d["MetricName"], tuple(sorted((x["Name"], x["Value"])
                                                       for x in d["Dimensions"])))]
            if "StatisticValues" in d:
                stats = d["StatisticValues"]
                entry["count"] += stats["SampleCount"]
                entry["sum"] += stats["Sum"]
                entry["min"] = min(entry["min"], stats["Minimum"])
                entry["max"] = max(entry["max"], stats["Maximum"])
            else:
                for value, count in zip(d["Values"], d["Counts"], strict=True):
                    entry["count"] += count
                    entry["sum"] += value * count
                    entry["values"] += [value] * int(count)
    return dict(out)


VARIANT = (("EndpointName", "my-endpoint"), ("VariantName", "AllTraffic"))
CONTAINER = (("ContainerName", "model"), *VARIANT)


def model(name: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((*VARIANT, ("TargetModel", name))))


def call(agent: Agent, path: str, method: str = "POST", body: bytes = b"{}",
         headers: dict[str, str] | None = None) -> int:
    return agent.get(path, method, body, headers).status


def test_eight_concurrent_requests_held_300_ms_give_maximum_8(tmp_path: Path) -> None:
    """8 clients at once on a server holding each request 300 ms: Maximum 8, Minimum 0,
    although they overlap for less than the sampling second."""
    agent = start(tmp_path)
    barrier = threading.Barrier(8)
    statuses: list[int] = []
    seen_by_clients: list[float] = []  # each request's whole time, from its client's side

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
        conn.connect()
        barrier.wait()
        began = time.monotonic()
        conn.request("POST", "/invocations?hold_ms=300", body=b"{}")
        answer = conn.getresponse()
        answer.read()
        seen_by_clients.append(time.monotonic() - began)
        statuses.append(answer.status)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 8
    agent.stop()
    got = figures(agent.calls)
    for dims in (VARIANT, CONTAINER):
        concurrency = got[("ConcurrentRequestsPerModel", dims)]
        assert (concurrency["max"], concurrency["min"]) == (8, 0), concurrency
        # Sum = request-seconds in flight: at least 8 × 0.3 s held by the server, at most
        # what the clients measured around the same requests (a busy machine stretches both).
        # SampleCount = seconds sampled, Average = their ratio, the mean in flight.
        assert 2.4 <= concurrency["sum"] <= sum(seen_by_clients) + 0.01, (concurrency,
                                                                          seen_by_clients)
        assert 0 < concurrency["sum"] / concurrency["count"] < 8


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def test_streamed_answers_time_first_byte_and_chunks(tmp_path: Path) -> None:
    """Chunked and server-sent-event answers, 150 ms to the first chunk and 20 ms between
    chunks: the agent's p50s match what the server itself recorded sending (within 5 ms
    and 2 ms), and the nominal figures; Prometheus has the OpenTelemetry-named histograms."""
    agent = start(tmp_path, TELEMETRY_PROXY_METRICS="true")
    streams = ["/invocations?chunks=8&first_ms=150&gap_ms=20"] * 6 + [
        "/invocations?chunks=8&first_ms=150&gap_ms=20&sse=1"] * 2
    for path in streams:
        assert call(agent, path) == 200
    assert call(agent, "/invocations") == 200  # not streamed: no figure
    page = _scrape(agent)
    _, err = agent.stop()
    got = figures(agent.calls)
    sent = [json.loads(line) for line in (tmp_path / "sent.jsonl").read_text().splitlines()]
    server_first = _p50([s["first"] * 1e6 for s in sent])
    server_gap = _p50([g * 1e6 for s in sent for g in s["gaps"]])
    for dims in (VARIANT, CONTAINER):
        first = got[("ModelTimeToFirstByte", dims)]["values"]
        gaps = got[("ModelInterChunkLatency", dims)]["values"]
        assert len(first) == 8 and len(gaps) == 8 * 7
        assert abs(_p50(first) - server_first) <= 5_000, (first, server_first)
        assert abs(_p50(gaps) - server_gap) <= 2_000, (sorted(gaps), server_gap)
        assert abs(_p50(first) - 150_000) <= 5_000 and abs(_p50(gaps) - 20_000) <= 2_000
    assert got[("Invocations", VARIANT)]["sum"] == 9
    assert b"sagemaker_agent_time_to_first_chunk_seconds_count 8.0" in page
    assert b"sagemaker_agent_time_per_output_chunk_seconds_count 56.0" in page
    assert b"sagemaker_agent_concurrent_requests 0.0" in page  # /metrics is no invocation
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                               check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    stopped = next(e for e in agent_events(err) if e["event"] == "agent_stopped")
    assert stopped["proxy_stream_gaps_dropped"] == 0


def _scrape(agent: Agent) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    conn.request("GET", "/metrics")
    page = conn.getresponse().read()
    conn.close()
    return page


def test_multi_model_load_invoke_unload_sequence(tmp_path: Path) -> None:
    """SageMaker's multi-model calls: exact invocations per TargetModel (bounded: the third
    name folds into Other), load/unload durations for the successful calls only, and
    LoadedModelCount from the answers' statuses."""
    agent = start(tmp_path, TELEMETRY_MAX_MODELS="2")
    target = {"X-Amzn-SageMaker-Target-Model": "a.tar.gz"}
    steps = [
        ("/models", "POST", b'{"model_name": "a", "url": "/opt/ml/models/a/model"}', {}, 200),
        ("/models", "POST", b'{"model_name": "b", "url": "/opt/ml/models/b/model"}', {}, 200),
        ("/models", "POST", b'{"model_name": "a", "url": "/opt/ml/models/a/model"}', {}, 409),
        *[("/models/a/invoke", "POST", b"[]", target, 200)] * 3,
        *[("/models/b/invoke", "POST", b"[]", {}, 200)] * 2,
        ("/models/c/invoke", "POST", b"[]", {}, 404),        # a third name: Other
        ("/invocations", "POST", b"[]", {"X-Amzn-SageMaker-Inference-Component": "ic-1"}, 200),
        ("/models/a", "DELETE", b"", {}, 200),
        ("/models/a", "DELETE", b"", {}, 404),
        ("/models", "POST", b'{"model_name": "c", "url": "/opt/ml/models/c/model"}', {}, 200),
        ("/models", "GET", b"", {}, 200),                     # list models: not counted
    ]
    for path, method, body, headers, status in steps:
        assert call(agent, path, method, body or None, headers) == status, (path, method)
    _, err = agent.stop()
    got = figures(agent.calls)
    assert got[("Invocations", VARIANT)]["sum"] == 7  # 6 model invocations + 1 /invocations
    assert got[("Invocations", model("a.tar.gz"))]["sum"] == 3  # the header names it
    assert got[("Invocations", model("b"))]["sum"] == 2        # else the path
    assert got[("Invocations", model("Other"))]["sum"] == 1
    assert got[("InvocationModelErrors", model("Other"))]["sum"] == 1
    errors_b = got[("InvocationModelErrors", model("b"))]
    assert (errors_b["count"], errors_b["sum"]) == (2, 0)
    assert got[("Invocations", (("InferenceComponentName", "ic-1"),))]["sum"] == 1
    assert not any(("TargetModel", "c") in dims for _, dims in got)
    loading = got[("ModelLoadingTime", VARIANT)]["values"]
    unloading = got[("ModelUnloadingTime", VARIANT)]["values"]
    assert len(loading) == 3 and all(100_000 <= v < 200_000 for v in loading), loading
    assert len(unloading) == 1 and 50_000 <= unloading[0] < 150_000, unloading
    loaded = next(v for (name, dims), v in got.items() if name == "LoadedModelCount"
                  and dims == (("Host", "my-endpoint/AllTraffic/i-0123456789abcdef0"),))
    assert (loaded["min"], loaded["max"]) == (1, 2), loaded  # a, b; b; b, c
    stopped = next(e for e in agent_events(err) if e["event"] == "agent_stopped")
    assert (stopped["model_loads"], stopped["model_load_failures"], stopped["model_unloads"],
            stopped["model_unload_failures"], stopped["models_folded"]) == (3, 1, 1, 1, 1)
