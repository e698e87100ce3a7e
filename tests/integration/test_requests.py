"""Request metrics through the real proxy, the hooks in real servers, and StatsD over UDP.

The agent runs as a process around the example model server (or a server of the
test's own), real HTTP clients talk to it, and the figures are read back from the
PutMetricData calls the agent records in its file sink at shutdown.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.cloud import free_port
from tests.conftest import AGENT, agent_events, base_env, read_calls, wait_for_stderr

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).parent.parent.parent
SERVER = [sys.executable, str(ROOT / "examples" / "sample_server.py")]


class Agent:
    """The agent around `cmd`, with the proxy on a free port in front of the server."""

    def __init__(self, tmp_path: Path, cmd: list[str], **extra: str) -> None:
        self.port, self.upstream = free_port(), free_port()
        self.calls = tmp_path / "calls.jsonl"
        env = base_env(tmp_path, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{self.port}",
                       TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{self.upstream}",
                       TELEMETRY_CONTAINER_NAME="model", **extra)
        self.proc = subprocess.Popen([*AGENT, "run", "--", *cmd], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.get("/ping").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.proc.kill()  # never leave an agent behind to hold its ports
        _, err = self.proc.communicate(timeout=30)
        raise AssertionError(f"the server did not come up behind the proxy: {err[-2000:]!r}")

    def get(self, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response

    def stop(self) -> tuple[dict[tuple[str, tuple[str, ...]], dict[str, Any]], bytes]:
        """SIGTERM; the final interval's invocation datums by (metric, dimension names)."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return invocation_datums(self.calls), err


def invocation_datums(calls: Path) -> dict[tuple[str, tuple[str, ...]], dict[str, Any]]:
    """Merged statistics per (metric, dimension names) of the invocation namespace."""
    out: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = defaultdict(
        lambda: {"count": 0.0, "sum": 0.0, "values": []})
    for record in read_calls(calls):
        if record["api"] != "PutMetricData" or record["params"]["Namespace"] != "SageMakerAgent":
            continue
        for d in record["params"]["MetricData"]:
            key = (d["MetricName"], tuple(sorted(x["Name"] for x in d["Dimensions"])))
            entry = out[key]
            if "StatisticValues" in d:
                entry["count"] += d["StatisticValues"]["SampleCount"]
                entry["sum"] += d["StatisticValues"]["Sum"]
            else:
                for value, count in zip(d["Values"], d["Counts"], strict=True):
                    entry["count"] += count
                    entry["sum"] += value * count
                    entry["values"] += [value] * int(count)
    return dict(out)


VARIANT = ("EndpointName", "VariantName")
CONTAINER = ("ContainerName", "EndpointName", "VariantName")


def test_proxy_counts_mixed_statuses_and_times_the_model(tmp_path: Path) -> None:
    agent = Agent(tmp_path, SERVER)
    for _ in range(20):
        assert agent.get("/invocations", "POST", b"[1, 2]").status == 200
    for _ in range(5):
        assert agent.get("/invocations?status=404", "POST", b"[]").status == 404
    for _ in range(3):
        assert agent.get("/invocations?status=503", "POST", b"[]").status == 503
    for _ in range(4):
        assert agent.get("/invocations?sleep_ms=200", "POST", b"[1]").status == 200
    for _ in range(7):
        agent.get("/ping")  # passed through, not counted
    datums, _ = agent.stop()
    for dims in (VARIANT, CONTAINER):
        assert datums[("Invocations", dims)]["sum"] == 32
        assert datums[("Invocation4XXErrors", dims)] | {"values": []} == {
            "count": 32, "sum": 5, "values": []}
        assert datums[("Invocation5XXErrors", dims)]["sum"] == 3
        assert datums[("InvocationModelErrors", dims)] | {"values": []} == {
            "count": 32, "sum": 8, "values": []}  # 404s and 503s: any answer but 2XX
        assert datums[("InvocationsPerInstance", dims)]["sum"] == 32
    assert ("ContainerLatency", VARIANT) not in datums  # per container only
    model = sorted(datums[("ModelLatency", VARIANT)]["values"])
    container = sorted(datums[("ContainerLatency", CONTAINER)]["values"])
    assert len(model) == 32 and len(container) == 32
    assert all(200_000 <= v < 260_000 for v in model[-4:]), model[-4:]  # the slept ones
    assert all(v < 100_000 for v in model[:-4])
    assert all(200_000 <= v < 270_000 for v in container[-4:])
    overhead = datums[("OverheadLatency", VARIANT)]
    assert overhead["count"] == 32 and overhead["sum"] / 32 < 5_000  # µs the proxy adds


def test_chunked_both_ways_and_streamed_first_byte(tmp_path: Path) -> None:
    agent = Agent(tmp_path, SERVER)
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    conn.request("POST", "/invocations", body=iter([b"[1, ", b"2, 3]"]),
                 headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["mean"] == 2.0
    # A streamed answer: 5 chunks 300 ms apart; the first arrives long before the last.
    started = time.monotonic()
    conn.request("POST", "/invocations?chunks=5&chunk_ms=300", body=b"[]")
    answer = conn.getresponse()
    assert answer.getheader("Transfer-Encoding") == "chunked"
    first = answer.read1(100)
    first_at = time.monotonic() - started
    rest = answer.read()
    whole = time.monotonic() - started
    # Passed on at once, not held until the end: the first chunk came at least three of the
    # four 300 ms gaps before the last (measured in the same window, so a busy machine that
    # slows both cannot fail it; a buffering proxy delivers both at once).
    assert first.startswith(b"chunk 0") and first_at < whole - 0.9, (first_at, whole)
    assert (first + rest).count(b"chunk") == 5 and whole > 1.2
    conn.close()
    datums, _ = agent.stop()
    assert datums[("Invocations", VARIANT)]["sum"] == 2


def test_hundred_megabyte_upload_keeps_agent_memory_flat(tmp_path: Path) -> None:
    agent = Agent(tmp_path, SERVER)
    before = agent.ps.memory_info().rss
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], agent.ps.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    size = 100 * 2**20
    block = b"7" * 2**20

    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=120)
    conn.request("POST", "/invocations", body=(block for _ in range(100)),
                 headers={"Content-Length": str(size)})
    answer = conn.getresponse()
    body = json.loads(answer.read())
    done.set()
    watcher.join()
    assert answer.status == 200 and body["mean"] == size
    assert peak[0] - before < 20 * 2**20, (before, peak[0])
    agent.stop()


def test_keep_alive_is_reused_on_both_sides(tmp_path: Path) -> None:
    agent = Agent(tmp_path, SERVER)
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    for _ in range(20):
        conn.request("POST", "/invocations", body=b"[1]")
        assert conn.getresponse().read()
    conn.close()
    upstream = [c for c in agent.ps.net_connections() if c.raddr and c.raddr.port == agent.upstream]
    assert 1 <= len(upstream) <= 2, agent.ps.net_connections()  # pooled, not one per request
    agent.stop()


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     b"400"),
    (b"POST /invocations HTTP/1.1\r\nTransfer-Encoding: gzip, identity\r\n\r\nxx", b"400"),
    (b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n", b"400"),
    (b"GET /ping HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
])
def test_malformed_and_smuggling_requests_are_refused(tmp_path: Path, raw: bytes,
                                                      status: bytes) -> None:
    agent = Agent(tmp_path, SERVER)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = sock.recv(100)
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert agent.get("/invocations", "POST", b"[1]").status == 200  # still serving
    datums, err = agent.stop()
    assert datums[("Invocations", VARIANT)]["sum"] == 1  # refused requests reach no model
    stopped = next(e for e in agent_events(err) if e["event"] == "agent_stopped")
    assert sum(v for k, v in stopped.items() if k.startswith("proxy_refused_")) == 1


def test_upstream_down_dies_midway_or_silent_counts_5xx(tmp_path: Path) -> None:
    """A server of the test's own behind the proxy: one that refuses, one that dies
    mid-answer, one that never answers (504 after TELEMETRY_PROXY_TIMEOUT)."""
    script = tmp_path / "bad_server.py"
    script.write_text(
        "import os, socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('127.0.0.1', int(os.environ['SAGEMAKER_BIND_TO_PORT']))); s.listen()\n"
        "while True:\n"
        "    c, _ = s.accept(); data = c.recv(65536)\n"
        "    if b'/ping' in data:\n"
        "        c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n'); c.close()\n"
        "    elif b'die' in data:\n"
        "        c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 100\\r\\n\\r\\npartial'); c.close()\n"
        "    elif b'silent' in data:\n"
        "        time.sleep(3); c.close()\n")
    agent = Agent(tmp_path, [sys.executable, str(script)], TELEMETRY_PROXY_TIMEOUT="1")
    with pytest.raises(http.client.IncompleteRead):
        agent.get("/invocations?die", "POST", b"[]")
    assert agent.get("/invocations?silent", "POST", b"[]").status == 504
    datums, _ = agent.stop()
    assert datums[("Invocation5XXErrors", VARIANT)] | {"values": []} == {
        "count": 2, "sum": 2, "values": []}
    # the proxy's own 502 (the model broke mid-answer) and 504 (it stayed silent) are the
    # model's errors too
    assert datums[("InvocationModelErrors", VARIANT)] | {"values": []} == {
        "count": 2, "sum": 2, "values": []}


def test_unreachable_upstream_is_502(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{port}",
                   TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{free_port()}")
    proc = subprocess.Popen([*AGENT, "run"], env=env, stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/invocations", body=b"[]")
            assert conn.getresponse().status == 502
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    datums = invocation_datums(tmp_path / "calls.jsonl")
    assert datums[("Invocation5XXErrors", VARIANT)]["sum"] == 1
    assert datums[("InvocationModelErrors", VARIANT)]["sum"] == 1  # could not reach the model


def test_five_hundred_concurrent_connections(tmp_path: Path) -> None:
    agent = Agent(tmp_path, SERVER)

    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        body = b"[%d]" % i
        writer.write(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%b" % (len(body), body))
        answer = await reader.read()
        writer.close()
        return answer

    async def all_of_them() -> list[bytes]:
        return await asyncio.gather(*(one(i) for i in range(500)))

    answers = asyncio.run(all_of_them())
    assert sum(a.startswith(b"HTTP/1.1 200") for a in answers) == 500
    datums, _ = agent.stop()
    assert datums[("Invocations", VARIANT)]["sum"] == 500


# -- hooks in real servers ------------------------------------------------------------------

ASGI_APP = '''
from agent import hooks

@hooks.inference
async def predict(body):
    return b"ok"

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    status = 404 if scope["path"].startswith("/invocations/missing") else 200
    # predict() outside a middleware request would be reported on its own: only here.
    body = await predict(b"") if scope["path"].startswith("/invocations") else b"other"
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})

app = hooks.ASGIMiddleware(app)
'''

WSGI_APP = '''
import os
from agent import hooks

def app(environ, start_response):
    with hooks.inference():
        body = b"pid %d" % os.getpid()
    start_response("500 Oops" if "fail" in environ.get("QUERY_STRING", "") else "200 OK", [])
    return [body]

app = hooks.WSGIMiddleware(app)
'''


def hook_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = base_env(tmp_path)
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    env["PORT"] = str(port)
    return env


def drive(port: int, paths: list[str]) -> list[int]:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    statuses = []
    for path in paths:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", path, body=b"{}")
        statuses.append(conn.getresponse().status)
        conn.close()
    return statuses


def test_asgi_hooks_in_uvicorn(tmp_path: Path) -> None:
    (tmp_path / "asgi_app.py").write_text(ASGI_APP)
    port = free_port()
    proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, "-m", "uvicorn", "asgi_app:app",
                             "--port", str(port), "--log-level", "warning"],
                            env=hook_env(tmp_path, port), stderr=subprocess.PIPE)
    statuses = drive(port, ["/invocations"] * 30 + ["/invocations/missing"] * 3 + ["/other"])
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert statuses.count(200) == 31
    datums = invocation_datums(tmp_path / "calls.jsonl")
    assert datums[("Invocations", VARIANT)]["sum"] == 33
    assert datums[("Invocation4XXErrors", VARIANT)]["sum"] == 3
    assert datums[("InvocationModelErrors", VARIANT)]["sum"] == 3  # from the hooks' statuses
    assert datums[("ModelLatency", VARIANT)]["count"] == 33
    assert not any(name == "ConcurrentRequestsPerModel" for name, _ in datums)  # needs the proxy


def test_wsgi_hooks_in_gunicorn_workers_count_each_request_once(tmp_path: Path) -> None:
    (tmp_path / "wsgi_app.py").write_text(WSGI_APP)
    port = free_port()
    proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, "-m", "gunicorn", "-w", "3",
                             "-b", f"127.0.0.1:{port}", "wsgi_app:app"],
                            env=hook_env(tmp_path, port), stderr=subprocess.PIPE)
    statuses = drive(port, ["/invocations"] * 60 + ["/invocations?fail"] * 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert statuses.count(200) == 60, err[-2000:]
    datums = invocation_datums(tmp_path / "calls.jsonl")
    assert datums[("Invocations", VARIANT)]["sum"] == 66
    assert datums[("Invocation5XXErrors", VARIANT)]["sum"] == 6
    assert datums[("InvocationModelErrors", VARIANT)] | {"values": []} == {
        "count": 66, "sum": 6, "values": []}


def test_statsd_known_custom_and_garbage(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, TELEMETRY_STATSD=f"127.0.0.1:{port}")
    proc = subprocess.Popen([*AGENT, "run"], env=env, stderr=subprocess.PIPE)
    wait_for_stderr(proc, b'"agent_started"')  # logged once the listeners are bound
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(100):
        sock.sendto(b"sagemaker.invocation:%d|ms|#status:200" % (i % 10 + 1), ("127.0.0.1", port))
    sock.sendto(b"queue_depth:5|g|#queue:a\nqueue_depth:7|g|#queue:a", ("127.0.0.1", port))
    sock.sendto(b"cache_hits:3|c|@0.5", ("127.0.0.1", port))
    sock.sendto(b"\xff\xfe garbage\nno-colon\nx:1|zz\nnan:NaN|g", ("127.0.0.1", port))
    proc.send_signal(signal.SIGTERM)  # what waits in the socket's queue is taken at stop
    _, err = proc.communicate(timeout=30)
    datums = invocation_datums(tmp_path / "calls.jsonl")
    assert datums[("Invocations", VARIANT)]["sum"] == 100
    assert sorted(set(datums[("ModelLatency", VARIANT)]["values"])) == [
        float(ms * 1000) for ms in range(1, 11)]
    assert datums[("queue_depth", ("EndpointName", "VariantName", "queue"))]["sum"] == 12
    assert datums[("cache_hits", VARIANT)]["sum"] == 6  # 3 sampled at 1/2
    stopped = next(e for e in agent_events(err) if e["event"] == "agent_stopped")
    assert stopped["datagram_lines_malformed"] == 4


def test_metrics_on_the_front_port_pass_promtool(tmp_path: Path) -> None:
    """TELEMETRY_PROXY_METRICS=true: GET /metrics on the proxy's port is the agent's page,
    with invocation counters and latency histograms, valid for promtool."""
    agent = Agent(tmp_path, SERVER, TELEMETRY_PROXY_METRICS="true")
    for status in (200, 200, 404, 500):
        agent.get(f"/invocations?status={status}", "POST", b"[]")
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("GET", "/metrics")
    answer = conn.getresponse()
    page = answer.read()
    assert answer.status == 200 and answer.getheader("Content-Type").startswith("text/plain")
    assert b'sagemaker_agent_invocations_total{status_class="2xx"} 2.0' in page
    assert b'sagemaker_agent_invocations_total{status_class="5xx"} 1.0' in page
    assert b"sagemaker_agent_model_latency_seconds_bucket" in page
    check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    datums, _ = agent.stop()
    assert datums[("Invocations", VARIANT)]["sum"] == 4  # /metrics is not an invocation
