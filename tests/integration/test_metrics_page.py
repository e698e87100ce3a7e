"""`/metrics` on the proxy's port (TELEMETRY_PROXY_METRICS=true), as SageMaker's collector
scrapes it: the model server's own page followed by the agent's families, one page that
passes the real promtool, never a family name twice.

The real agent runs a small model server (a real process) whose `/metrics` is text
0.0.4 from prometheus_client, OpenMetrics whatever was asked, missing, silent, or not
an exposition at all.
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cloud import free_port
from tests.conftest import AGENT, base_env

pytestmark = pytest.mark.timeout(120)

SERVER = r'''
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from prometheus_client import CollectorRegistry, Counter, Histogram, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

MODE = sys.argv[1]
registry = CollectorRegistry()
tokens = Counter("vllm_generation_tokens", "Generated tokens", ["model_name"], registry=registry)
ttft = Histogram("vllm_time_to_first_token_seconds", "TTFT", ["model_name"], registry=registry)
# the agent's own family name, also defined by the model server: must not appear twice
clash = Counter("sagemaker_agent_invocations", "the model's own count", ["status_class"],
                registry=registry)
accept = Gauge("upstream_scrape_accept", "Accept header of the last scrape", ["accept"],
               registry=registry)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def send(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/ping":
            return self.send(200, b"")
        if self.path != "/metrics" or MODE == "missing":
            return self.send(404, b"not found")
        if MODE == "silent":
            time.sleep(30)
        if MODE == "html":
            return self.send(200, b"<html>hello</html>", "text/html")
        accept.clear()
        accept.labels(self.headers.get("Accept", "")).set(1)
        if MODE == "openmetrics":
            return self.send(200, openmetrics(registry),
                             "application/openmetrics-text; version=1.0.0; charset=utf-8")
        self.send(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        tokens.labels("m").inc(7)
        ttft.labels("m").observe(0.15)
        clash.labels("2xx").inc(100)
        self.send(200, b"{}", "application/json")

ThreadingHTTPServer(("127.0.0.1", int(os.environ["SAGEMAKER_BIND_TO_PORT"])), Handler).serve_forever()
'''

TYPE_LINE = re.compile(rb"^# TYPE (\S+) ", re.MULTILINE)


class Agent:
    """The agent with the proxy in front of SERVER in `mode`, /metrics on the front port."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        script = tmp_path / "server.py"
        script.write_text(SERVER)
        self.port, upstream = free_port(), free_port()
        env = base_env(tmp_path, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{self.port}",
                       TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{upstream}",
                       TELEMETRY_PROXY_METRICS="true")
        self.proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, str(script), mode],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/ping")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("the server did not come up behind the proxy")

    def request(self, method: str, path: str) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        return answer.status, answer.getheader("Content-Type") or "", body

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return err


@pytest.fixture
def agent_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Agent] = []

    def start(mode: str) -> Agent:
        started.append(Agent(tmp_path, mode))
        return started[-1]

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.stop()


def promtool(page: bytes) -> None:
    check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def type_names(page: bytes) -> list[bytes]:
    names = TYPE_LINE.findall(page)
    assert len(names) == len(set(names)), "a family name appears twice"
    return names


@pytest.mark.parametrize("mode", ["text", "openmetrics"])
def test_model_page_then_agent_families(agent_for, mode: str) -> None:  # type: ignore[no-untyped-def]
    """The model server's families, then the agent's; the agent's family that the model
    also defines is served prefixed; promtool is content; text 0.0.4 was asked for."""
    agent = agent_for(mode)
    for _ in range(3):
        assert agent.request("POST", "/invocations")[0] == 200
    status, ctype, page = agent.request("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    promtool(page)
    names = type_names(page)
    assert b'vllm_generation_tokens_total{model_name="m"} 21.0' in page
    assert b'vllm_time_to_first_token_seconds_count{model_name="m"} 3.0' in page
    # the model's own family keeps its name; the agent's is prefixed
    assert b'sagemaker_agent_invocations_total{status_class="2xx"} 300.0' in page
    assert b'telemetry_agent_sagemaker_agent_invocations_total{status_class="2xx"} 3.0' in page
    assert b"sagemaker_agent_model_latency_seconds_bucket" in page
    # the model's page first, then the agent's families
    assert names.index(b"vllm_generation_tokens_total") < names.index(
        b"sagemaker_agent_model_latency_seconds")
    assert b"# EOF" not in page
    if mode == "text":
        assert (b'upstream_scrape_accept{accept="text/plain;version=0.0.4;q=1.0,*/*;q=0.1"} 1.0'
                in page)
    err = agent.stop()
    assert b'"metrics_family_renamed"' in err and b"sagemaker_agent_invocations_total" in err


@pytest.mark.parametrize("mode", ["missing", "html", "silent"])
def test_no_model_page_means_the_agents_alone(agent_for, mode: str) -> None:  # type: ignore[no-untyped-def]
    """No usable page upstream (404, not an exposition, no answer in time): the agent's
    page alone, unprefixed, valid."""
    agent = agent_for(mode)
    assert agent.request("POST", "/invocations")[0] == 200
    started = time.monotonic()
    status, ctype, page = agent.request("GET", "/metrics")
    took = time.monotonic() - started
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    promtool(page)
    type_names(page)
    assert b'sagemaker_agent_invocations_total{status_class="2xx"} 1.0' in page
    assert b"telemetry_agent_" not in page and b"vllm" not in page
    assert took < 5  # the silent server is given 2 s
    err = agent.stop()
    assert b'"upstream_metrics_unavailable"' in err


def test_scraper_that_leaves_during_the_fetch(agent_for) -> None:  # type: ignore[no-untyped-def]
    """A scraper that hangs up while the model server is silent costs nothing: the next
    scrape on a new connection is answered, the agent logs no error and exits cleanly."""
    agent = agent_for("silent")
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.close()
    status, _, page = agent.request("GET", "/metrics")
    assert status == 200 and b"sagemaker_agent_invocations_total" in page
    err = agent.stop()
    assert agent.proc.returncode == 128 + signal.SIGTERM  # the server's own exit
    assert b'"agent_stopped"' in err
    assert b"Traceback" not in err and b'"level": "error"' not in err
