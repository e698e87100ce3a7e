"""The reliability matrix (docs/reliability.md): one fault per test, each checking that the child is
unaffected, the agent stays up (or exits with a clear message where that is right), nothing
the design keeps is lost, and memory stays within its bound. Each test prints one
`RELIABILITY | row | figure` line; docs/reliability.md's table comes from a run with `-s`.

Run on its own with `pytest -m reliability -s -n 0` (the figures print only without
xdist's workers). Rows covered elsewhere: 30 % throttling, a 15 s outage, credentials
rejected then fixed (test_delivery.py), malformed HTTP (test_requests.py), a child ignoring
SIGTERM and invalid UTF-8 (test_supervisor.py), Prometheus's port taken
(sinks/test_prometheus.py).
"""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.cloud import FaultProxy, MotoServer, free_port
from tests.conftest import AGENT, agent_events, base_env, log_messages, read_calls
from tests.integration.conftest import (
    RunningAgent,
    cloud_env,
    expected_lines,
    printer,
    start_outage,
    stored_messages,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]
MIB = 2**20


def report(row: str, figure: str) -> None:
    print(f"\nRELIABILITY | {row} | {figure}")


def stopped(stderr: bytes) -> dict[str, object]:
    return next(e for e in agent_events(stderr) if e["event"] == "agent_stopped")


def wait_for(condition: Callable[[], bool], failure: str, timeout: float = 60) -> None:
    """Poll until `condition()` holds: the test waits on the event, however loaded the machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def test_sixty_second_outage(tmp_path: Path, moto: MotoServer, proxy: FaultProxy) -> None:
    """CloudWatch away for 60 s (30 s of 503s, 30 s refused) while the child keeps printing."""
    env = cloud_env(tmp_path, proxy, TELEMETRY_INTERVAL="5", TELEMETRY_SAMPLE_INTERVAL="1")

    fault = start_outage(proxy, after=1.0, failing_s=30, refused_s=30)
    agent = RunningAgent(printer(62_000, pause_every=1000, pause_s=1.0), env)
    code, _, err = agent.wait(timeout=200)
    fault.join()
    assert code == 0
    assert stored_messages(moto) == expected_lines(62_000)
    datapoints = {d["Timestamp"] for s in proxy.calls("PutMetricData", "forwarded")
                  for d in s.body["MetricData"] if d["MetricName"] == "CPUUtilization"}
    assert len(datapoints) >= 12  # every 5 s interval of the minute, delivered late
    assert agent.peak_rss < 150 * MIB
    report("CloudWatch outage 60 s", f"62,000/62,000 lines and {len(datapoints)} intervals "
           f"delivered after it; peak RSS {agent.peak_rss / MIB:.0f} MB; "
           f"{stopped(err)['retries']} retries")


def test_child_prints_a_gigabyte(tmp_path: Path) -> None:
    """1 GB as fast as the child can: passed through byte-exact, memory bounded."""
    env = base_env(tmp_path, TELEMETRY_CLOUDWATCH="off")
    env.pop("TELEMETRY_FILE_SINK")
    code = ("import os\nblock = (b'x' * 99 + b'\\n') * 10486\n"
            "for _ in range(1024):\n    os.write(1, block)\n")
    proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = [0]
    digest = hashlib.sha256()
    total = 0

    def watch() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    started = time.monotonic()
    assert proc.stdout is not None
    while chunk := proc.stdout.read(4 * MIB):
        digest.update(chunk)
        total += len(chunk)
    err = proc.stderr.read() if proc.stderr else b""
    proc.wait(60)
    elapsed = time.monotonic() - started
    expected = hashlib.sha256((b"x" * 99 + b"\n") * 10486 * 1024).hexdigest()
    assert proc.returncode == 0 and total == 10486 * 1024 * 100
    assert digest.hexdigest() == expected
    assert peak[0] < 200 * MIB
    stats = stopped(err)
    assert stats["log_events_sent"] > 0
    report("child prints 1 GB flat out", f"{total / MIB:,.0f} MiB passed through byte-exact in "
           f"{elapsed:.1f} s; peak RSS {peak[0] / MIB:.0f} MB; {stats['log_events_sent']:,} "
           f"events shipped; {stats['child_output_dropped_bytes'] / MIB:,.0f} MiB over the intake "
           f"bound and {stats['log_events_dropped_overflow']:,} events over the buffer bound "
           "dropped, counted and reported in agent_stopped")


def test_ten_megabyte_line_without_newline(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    code = "import os\nfor _ in range(10):\n    os.write(1, b'z' * 2**20)\n"
    proc = subprocess.run([*AGENT, "run", "--", sys.executable, "-c", code], env=env,
                          capture_output=True, timeout=120, check=False)
    messages = log_messages(tmp_path / "calls.jsonl")
    assert proc.returncode == 0 and proc.stdout == b"z" * 10 * MIB
    assert "".join(messages) == "z" * 10 * MIB and len(messages) >= 10
    assert all(len(m.encode()) <= 1_048_576 - 26 for m in messages)
    report("10 MB line, no newline", f"passed through exactly; {len(messages)} events of ≤ 1 MB, "
           "nothing truncated")


def test_nul_bytes_and_invalid_utf8(tmp_path: Path) -> None:
    raw = b"a\x00b\n\xff\xfe bad \xc3\x28 utf8\nok\n"
    env = base_env(tmp_path)
    proc = subprocess.run([*AGENT, "run", "--", sys.executable, "-c",
                           f"import os; os.write(1, {raw!r})"], env=env, capture_output=True,
                          timeout=60, check=False)
    messages = log_messages(tmp_path / "calls.jsonl")
    assert proc.returncode == 0 and proc.stdout == raw
    assert messages == ["a\x00b", "\ufffd\ufffd bad \ufffd( utf8", "ok"]
    report("NUL bytes and invalid UTF-8", "passed through byte-exact; events valid UTF-8 "
           "(U+FFFD), NUL kept")


def test_child_killed_by_sigkill(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    code = "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([*AGENT, "run", "--", sys.executable, "-c", code], env=env,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 137 and proc.stdout == b"before\n"
    assert log_messages(tmp_path / "calls.jsonl") == ["before"]
    report("child killed by SIGKILL", "agent exits 137 after flushing the child's last lines")


def test_agent_sigterm_child_ignores_it(tmp_path: Path) -> None:
    env = base_env(tmp_path, TELEMETRY_STOP_GRACE="2")
    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ignoring', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ignoring\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 137 and 2.0 <= elapsed < 6.0
    assert any(e["event"] == "child_killed" for e in agent_events(err))
    assert log_messages(tmp_path / "calls.jsonl") == ["ignoring"]
    report("SIGTERM, child ignores it", f"SIGKILL after the 2 s grace; agent out in "
           f"{elapsed:.1f} s with exit 137, logs flushed")


def test_garbage_and_huge_datagrams_on_the_hook_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "hooks.sock"
    env = base_env(tmp_path, TELEMETRY_HOOK_SOCKET=str(sock_path), TELEMETRY_INTERVAL="1")
    proc = subprocess.Popen([*AGENT, "run"], env=env, stderr=subprocess.PIPE)
    wait_for(sock_path.exists, "the hook socket never appeared")
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sent_huge = 0
    for size in (64 * 1024, 200 * 1024, MIB):
        try:
            sender.sendto(b"x" * size, str(sock_path))
            sent_huge += 1
        except OSError:
            pass  # the kernel refuses datagrams over its limit: the sender sees it, not the agent
    for blob in (b"\x00" * 100, b"\xff" * 5000, b"a:b:c|d|e\n" * 500, b"sagemaker.invocation:x|ms"):
        sender.sendto(blob, str(sock_path))
    sender.sendto(b"sagemaker.invocation:5|ms|#status:200", str(sock_path))
    # Stop only once the valid datagram has been read (its interval reached the file sink):
    # datagrams still queued when the agent closes the socket are not read.
    def counted() -> bool:
        try:
            calls = read_calls(tmp_path / "calls.jsonl")
        except ValueError:  # a record half written: look again
            return False
        return any(d["MetricName"] == "Invocations" for c in calls if c["api"] == "PutMetricData"
                   for d in c["params"]["MetricData"])

    wait_for(counted, "the valid datagram was never counted")
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    stats = stopped(err)
    assert alive and proc.returncode == 0
    assert stats["requests"] == 1 and stats["datagram_lines_malformed"] >= 500
    report("garbage and 1 MB datagrams on the hook socket",
           f"agent up; {stats['datagram_lines_malformed']} malformed lines counted; "
           f"{sent_huge} of 3 oversized datagrams accepted by the kernel; the valid one counted")


def test_spool_unwritable_stands_in_for_a_full_disk(tmp_path: Path, moto: MotoServer,
                                                    proxy: FaultProxy) -> None:
    """The spool path cannot be created (a file is in the way): the agent says so, keeps data in
    memory, and delivers it when CloudWatch is back."""
    blocker = tmp_path / "spool"
    blocker.write_text("not a directory")
    proxy.listen(False)
    threading.Timer(3.0, proxy.listen, args=(True,)).start()
    env = cloud_env(tmp_path, proxy, TELEMETRY_SPOOL_DIR=str(blocker / "inner"))
    code, _, err = RunningAgent(printer(5000), env).wait()
    assert code == 0
    assert any(e["event"] == "spool_unavailable" for e in agent_events(err))
    assert stored_messages(moto) == expected_lines(5000)
    report("spool unwritable (stands in for a full disk)", "one spool_unavailable error; "
           "5,000/5,000 lines kept in memory and delivered")


def test_unwritable_file_sink(tmp_path: Path) -> None:
    env = base_env(tmp_path, TELEMETRY_FILE_SINK="/proc/no-such-dir/calls.jsonl")
    proc = subprocess.run([*AGENT, "run", "--", sys.executable, "-c", "print('fine')"], env=env,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == b"fine\n"
    errors = [e for e in agent_events(proc.stderr) if e["level"] == "error"]
    assert errors, proc.stderr[-2000:]
    assert read_calls(Path("/proc/no-such-dir/calls.jsonl")) == []
    report("unwritable file sink", f"child unaffected; one error line ({errors[0]['event']})")


def test_prometheus_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(tmp_path, TELEMETRY_PROMETHEUS=f"127.0.0.1:{port}",
                       TELEMETRY_STATSD=f"127.0.0.1:{free_port()}")
        proc = subprocess.run([*AGENT, "run", "--", sys.executable, "-c", "print('fine')"],
                              env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == b"fine\n"
    assert b"prometheus_unavailable" in proc.stderr
    report("Prometheus port taken", "one prometheus_unavailable line; child and agent go on")
