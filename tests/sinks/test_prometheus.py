"""Prometheus output: real HTTP from the running agent, checked with the real promtool."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import AGENT, base_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout: float = 40) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            # The first sample has no CPU figure yet (it needs two readings): wait for one.
            if 'sagemaker_agent_cpu_usage_cores{view="container"}' in text:
                return text
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no metrics served")
        time.sleep(0.2)


class TestPrometheus:
    def test_agent_serves_metrics_that_pass_promtool(self, tmp_path: Path) -> None:
        """/metrics on 127.0.0.1 has system and agent series and passes promtool check metrics."""
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.fail("promtool is needed (Debian package prometheus; .ci/run installs it)")
        port = free_port()
        env = base_env(tmp_path, TELEMETRY_PROMETHEUS=f"127.0.0.1:{port}",
                       TELEMETRY_SAMPLE_INTERVAL="0.2")
        proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, "-c",
                                 "import time; print('up', flush=True); time.sleep(30)"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            text = scrape(port)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                               text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        for name in ("sagemaker_agent_cpu_usage_cores{view=\"container\"}",
                     "sagemaker_agent_memory_used_bytes{view=\"host\"}",
                     "sagemaker_agent_disk_size_bytes", "agent_samples_total"):
            assert name in text, f"{name} missing from:\n{text[:3000]}"

    def test_port_taken_is_reported_and_child_runs(self, tmp_path: Path) -> None:
        """A taken Prometheus port is a clear error line; the agent and child go on."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            env = base_env(tmp_path, TELEMETRY_PROMETHEUS=f"127.0.0.1:{port}")
            done = subprocess.run([*AGENT, "run", "--", sys.executable, "-c", "print('fine')"],
                                  env=env, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0 and done.stdout == b"fine\n"
        assert b"prometheus_unavailable" in done.stderr
