"""The in-process hooks: light to import, never raising, never blocking."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import hooks
from agent.rules.statsd import invocation_record, parse_datagram


def test_import_pulls_in_nothing_heavy() -> None:
    code = ("import sys, agent.hooks\n"
            "heavy = {'boto3', 'botocore', 'psutil', 'structlog', 'prometheus_client', 'httptools',"
            " 'agent.app', 'agent.config'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_agent_means_dropped_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = hooks.dropped()
    monkeypatch.delenv("TELEMETRY_HOOK_SOCKET", raising=False)
    assert hooks.record(status=200, model_s=0.01) is False
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(tmp_path / "nobody-here.sock"))
    with hooks.inference():
        pass
    assert hooks.record(status="not a status", model_s=0.01) is False  # type: ignore[arg-type]
    assert hooks.dropped() == before + 2


def test_a_full_socket_never_blocks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An agent that does not read: sends return at once and are counted as dropped."""
    path = tmp_path / "slow.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(path))
    before = hooks.dropped()
    started = time.perf_counter()
    results = [hooks.record(status=200, model_s=0.001) for _ in range(5000)]
    elapsed = time.perf_counter() - started
    server.close()
    assert elapsed < 2.0
    assert results.count(False) == hooks.dropped() - before > 0
    assert results.count(True) > 0


def test_datagrams_parse_back_to_the_request(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(path))
    assert hooks.record(status=503, model_s=0.0125, container_s=0.02)

    @hooks.inference
    def predict(x: int) -> int:
        return x * 2

    assert predict(21) == 42
    samples = [parse_datagram(server.recv(4096))[0][0] for _ in range(2)]
    first, second = (invocation_record(s) for s in samples)
    assert first is not None and first.status == 503
    assert first.model_us == pytest.approx(12_500) and first.container_us == pytest.approx(20_000)
    assert second is not None and second.status == 200 and second.container_us is None
    server.close()


def test_hook_socket_is_private(tmp_path: Path) -> None:
    """The socket the agent makes is 0600 in a 0700 directory."""
    import asyncio

    from agent.sources.statsd import DatagramIntake, listen_unix

    async def make() -> None:
        transport = await listen_unix(DatagramIntake(lambda _: None), tmp_path / "d" / "h.sock")
        transport.close()

    path = tmp_path / "d" / "h.sock"
    asyncio.run(make())
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_uid == os.getuid()


def test_reconnects_after_the_agent_restarts(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(path))
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(str(path))
    assert hooks.record(status=200, model_s=0.001)
    first.close()
    path.unlink()
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(str(path))  # a new agent on the same path
    results = [hooks.record(status=200, model_s=0.002) for _ in range(3)]
    assert results[-1] is True and results.count(True) >= 2
    assert second.recv(4096).startswith(b"sagemaker.invocation:2.000|ms")
    second.close()
