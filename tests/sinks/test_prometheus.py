"""Prometheus output: real HTTP from the running agent, checked with the real promtool."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.model import RequestRecord
from agent.sinks.aws import AwsCaller
from agent.sinks.prometheus import (
    LatestReadings,
    LoopRegistry,
    PrometheusSink,
    ReadingsCollector,
)
from tests.cloud import free_port
from tests.conftest import AGENT, base_env


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
            text = scrape(port)  # polls until a sample with a CPU figure is served
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


class TestScrapeWhileTheLoopMutates:
    """Threads see snapshots: prometheus_client serves /metrics from its own threads, while
    everything the collectors read belongs to the event loop."""

    def test_tight_scrapes_from_threads_never_meet_a_changing_dict(self) -> None:
        """Four threads scrape a real /metrics on 127.0.0.1 back to back while the loop adds
        and removes AwsCaller series and observes requests: every scrape is a 200 with the
        families, none an error. Before, the server's thread iterated the loop's
        dictionaries (`RuntimeError: dictionary changed size during iteration`: HTTP 500)."""
        port = free_port()
        caller = AwsCaller(send=False, file_sink=None, region=None)
        for n in range(1200):
            caller.stats["calls", f"Api{n}", "ok"] += 1
        sink = PrometheusSink(("127.0.0.1", port), series=caller.series,
                              counters=lambda: {k: float(v) for k, v in caller.counters().items()})
        errors: list[str] = []
        statuses: list[int] = []
        pages: list[str] = []

        def scrape_many(count: int) -> None:
            for _ in range(count):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=20) as answer:
                        statuses.append(answer.status)
                        pages.append(answer.read().decode())
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(repr(exc))

        async def scenario() -> None:
            sink.start()
            done = asyncio.Event()

            async def mutate() -> None:
                i = 0
                while not done.is_set():
                    for _ in range(300):
                        i += 1
                        caller.stats["retries", f"Api{i % 1200}", "throttled"] += 1
                        if i % 2:
                            caller.stats.pop(("retries", f"Api{(i * 7) % 1200}", "throttled"), None)
                        sink.requests.observe(RequestRecord(200 + 100 * (i % 4), i % 997, i % 991))
                    await asyncio.sleep(0)

            mutator = asyncio.create_task(mutate())
            threads = [threading.Thread(target=scrape_many, args=(20,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            await asyncio.to_thread(lambda: [thread.join() for thread in threads])
            done.set()
            await mutator
            await sink.stop(time.monotonic() + 5)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # threads take turns 50 times as often: races show sooner
        try:
            asyncio.run(scenario())
        finally:
            sys.setswitchinterval(interval)
        assert errors == [], f"{len(errors)} failed scrapes, e.g. {errors[:3]}"
        assert statuses == [200] * 80
        assert all("agent_aws_calls_total" in page and "agent_retries_total" in page
                   and "sagemaker_agent_invocations_total" in page for page in pages)

    def test_scrape_when_the_loop_is_blocked_serves_the_last_figures(self) -> None:
        """A loop that does not answer in time: the scrape gets the previous families
        (counted as stale) instead of reading the loop's structures from its thread."""
        registry = LoopRegistry(timeout=0.2)
        latest = LatestReadings(counters=lambda: {"samples": 3.0})
        registry.register(ReadingsCollector(latest))
        first: list[bytes] = []

        async def scenario() -> bytes:
            registry.bind(asyncio.get_running_loop())
            first.append(await asyncio.to_thread(generate_latest, registry))
            result: list[bytes] = []
            thread = threading.Thread(target=lambda: result.append(generate_latest(registry)))
            thread.start()
            thread.join()  # blocks the loop: it cannot build this scrape's families
            return result[0]

        second = asyncio.run(scenario())
        assert b"agent_samples_total 3.0" in first[0]
        assert second == first[0]
        assert registry.stale_scrapes == 1
