"""stdout is the commands' output only: agent lines are JSON on stderr, under any environment."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AGENT, base_env, run_agent


@pytest.fixture
def imds() -> Iterator[socket.socket]:
    """A metadata 'service' on 127.0.0.1 that takes connections and never answers: the agent
    gives up after its short timeout, and the test can see that it asked here (not a real
    address)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def unsafe_env(tmp_path: Path, imds: socket.socket, **extra: str) -> dict[str, str]:
    """As a user's shell would be: no AWS_EC2_METADATA_DISABLED and no TELEMETRY_HOST, so the
    agent looks the instance id up (at our local stand-in)."""
    env = base_env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:"
                   f"{imds.getsockname()[1]}", **extra)
    del env["AWS_EC2_METADATA_DISABLED"], env["TELEMETRY_HOST"]
    return env


def agent_lines(stderr: bytes) -> list[dict[str, Any]]:
    """Every stderr line, each of which must be one of the agent's JSON log lines."""
    out = []
    for line in stderr.decode().splitlines():
        event = json.loads(line)
        assert event["logger"] == "telemetry-agent" and "level" in event and "timestamp" in event
        out.append(event)
    return out


def asked(imds: socket.socket) -> bool:
    imds.settimeout(0)
    try:
        conn, _ = imds.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.mark.parametrize("command", ["dashboard", "check-config"])
def test_one_shot_output_is_json_without_metadata_disabled(
        tmp_path: Path, imds: socket.socket, command: str) -> None:
    """`dashboard > body.json` and `check-config` give JSON on stdout even when the instance
    id lookup fails and says so; that line is JSON on stderr."""
    done = subprocess.run([*AGENT, command], env=unsafe_env(tmp_path, imds),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), dict)
    events = agent_lines(done.stderr)
    assert [e["event"] for e in events] == ["instance_id_unavailable"]
    assert asked(imds)  # the lookup went to AWS_EC2_METADATA_SERVICE_ENDPOINT, nowhere else


def test_check_config_errors_are_json_too(tmp_path: Path, imds: socket.socket) -> None:
    """An invalid configuration: exit 2, the problems as JSON on stdout and in one log line."""
    env = unsafe_env(tmp_path, imds, TELEMETRY_INTERVAL="7", TELEMETRY_INTERVALL="60")
    done = subprocess.run([*AGENT, "check-config"], env=env, capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    problems = json.loads(done.stdout)["problems"]
    assert len(problems) == 2
    assert any("did you mean TELEMETRY_INTERVAL?" in p for p in problems)
    (event,) = agent_lines(done.stderr)
    assert event["event"] == "config_invalid" and event["problems"] == problems
    assert event["level"] == "error"


def test_run_keeps_stdout_for_the_child(tmp_path: Path, imds: socket.socket) -> None:
    """`run`: stdout is exactly the child's; every agent line, start to stop, is JSON on stderr."""
    env = unsafe_env(tmp_path, imds)
    done = run_agent([sys.executable, "-c", "print('child says hi')"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"child says hi\n"
    events = [e["event"] for e in agent_lines(done.stderr)]
    assert events[0] == "instance_id_unavailable" and events[-1] == "agent_stopped"
    assert "child_started" in events and "child_exited" in events
