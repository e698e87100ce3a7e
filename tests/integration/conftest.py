"""Fixtures for tests against a real moto server behind the fault-injecting proxy."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.cloud import REGION, FaultProxy, MotoServer
from tests.conftest import AGENT, base_env

GROUP = "/aws/sagemaker/Endpoints/my-endpoint"
STREAM = "AllTraffic/i-0123456789abcdef0"


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    moto.reset()
    fault_proxy = FaultProxy(moto.port)
    yield fault_proxy
    fault_proxy.stop()


def cloud_env(tmp_path: Path, proxy: FaultProxy, **extra: str) -> dict[str, str]:
    """The agent's environment: CloudWatch on, through the proxy, no file sink."""
    settings = {"TELEMETRY_CLOUDWATCH": "on", "AWS_REGION": REGION, "AWS_ENDPOINT_URL": proxy.url,
                "TELEMETRY_SHUTDOWN_TIMEOUT": "30", "TELEMETRY_AWS_TIMEOUT": "2"}
    env = base_env(tmp_path, **(settings | extra))
    if "TELEMETRY_FILE_SINK" not in extra:
        env.pop("TELEMETRY_FILE_SINK")
    return env


def printer(count: int, width: int = 80, pause_every: int = 0, pause_s: float = 0.0) -> list[str]:
    """A child that prints `count` numbered lines (pausing now and then)."""
    code = (f"import sys, time\n"
            f"for i in range({count}):\n"
            f"    print(f'line {{i:07d}} ' + 'x' * {width})\n"
            f"    if {pause_every} and i % {pause_every or 1} == {pause_every or 1} - 1:\n"
            f"        sys.stdout.flush(); time.sleep({pause_s})\n")
    return ["python3", "-c", code]


def expected_lines(count: int, width: int = 80) -> list[str]:
    return [f"line {i:07d} " + "x" * width for i in range(count)]


def stored_messages(moto: MotoServer, group: str = GROUP, stream: str = STREAM) -> list[str]:
    """Every message in the stream, oldest first."""
    logs = moto.client("logs")
    out: list[str] = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream,
                                  "startFromHead": True, "limit": 10_000}
        if token:
            kwargs["nextToken"] = token
        page = logs.get_log_events(**kwargs)
        out.extend(e["message"] for e in page["events"])
        if not page["events"] or page["nextForwardToken"] == token:
            return out
        token = page["nextForwardToken"]


class RunningAgent:
    """The agent as a process, with its peak memory sampled while it runs."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*AGENT, "run", "--", *cmd], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.peak_rss = 0
        self._ps = psutil.Process(self.proc.pid)

    def wait(self, timeout: float = 120) -> tuple[int, bytes, bytes]:
        import threading

        chunks: dict[str, bytes] = {}

        def read(name: str, stream: Any) -> None:
            chunks[name] = stream.read()

        readers = [threading.Thread(target=read, args=(n, s)) for n, s in
                   (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for t in readers:
            t.start()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self.peak_rss = max(self.peak_rss, self._ps.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        for t in readers:
            t.join()
        return self.proc.wait(), chunks["out"], chunks["err"]


def start_outage(proxy: FaultProxy, *, after: float, failing_s: float,
                 refused_s: float) -> threading.Thread:
    """In the background: after `after` s, answer 503 for `failing_s`, then refuse
    connections for `refused_s`, then serve again."""

    def outage() -> None:
        time.sleep(after)
        proxy.faults.status_503 = True
        time.sleep(failing_s)
        proxy.listen(False)
        proxy.faults.status_503 = False
        time.sleep(refused_s)
        proxy.listen(True)

    thread = threading.Thread(target=outage)
    thread.start()
    return thread
