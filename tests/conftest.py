"""Shared fixtures: a safe AWS-free environment and a helper that runs the real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

# Never let a test reach a real AWS endpoint or the instance-metadata service.
SAFE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIDTESTTESTTEST",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key-never-printed-0123456789",
    "AWS_EC2_METADATA_DISABLED": "true",
}
for _k, _v in SAFE_AWS.items():
    os.environ[_k] = _v
for _k in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
    os.environ.pop(_k, None)

AGENT = [sys.executable, "-m", "agent"]


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment for running the agent: dry run, no listeners, a file sink in tmp."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TELEMETRY_") and k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    env.update(SAFE_AWS)
    env.update({
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "TELEMETRY_PROMETHEUS": "off",
        "TELEMETRY_STATSD": "off",
        "TELEMETRY_ENDPOINT_NAME": "my-endpoint",
        "TELEMETRY_HOST": "i-0123456789abcdef0",
        "TELEMETRY_FILE_SINK": str(tmp_path / "calls.jsonl"),
        "TELEMETRY_SHUTDOWN_TIMEOUT": "10",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_agent(cmd: list[str], env: Mapping[str, str], timeout: float = 60,
              **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """Run `telemetry-agent run -- cmd` to completion."""
    return subprocess.run([*AGENT, "run", "--", *cmd], env=dict(env), capture_output=True,
                          timeout=timeout, check=False, **kwargs)


def read_calls(path: Path) -> list[dict[str, Any]]:
    """The file sink's records."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def log_messages(path: Path) -> list[str]:
    """Every PutLogEvents message recorded in a file sink, in call order."""
    out: list[str] = []
    for record in read_calls(path):
        if record["api"] == "PutLogEvents":
            out.extend(e["message"] for e in record["params"]["logEvents"])
    return out


def wait_for_stderr(proc: subprocess.Popen[bytes], expected: bytes, timeout: float = 30) -> bytes:
    """Read the agent's stderr up to the line holding `expected`; return what was read."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if expected in line:
            return seen
        if not line:
            break
    raise AssertionError(f"{expected!r} never logged: {seen[-2000:]!r}")


def agent_events(stderr: bytes) -> list[dict[str, Any]]:
    """The agent's own JSON log lines found on stderr."""
    events = []
    for line in stderr.splitlines():
        if line.startswith(b'{"') and b'"logger": "telemetry-agent"' in line:
            events.append(json.loads(line))
    return events


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The reliability matrix first: its long tests (a 60 s outage) then overlap the rest of
    the suite on the other worker instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("reliability") is None)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(tmp_path)
