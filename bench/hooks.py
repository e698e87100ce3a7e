"""Hook cost in the model's process and StatsD intake by the agent, in one run.

DESIGN §9: a hook call ≤ 5 µs median and never blocking (peer: prometheus_client
`Histogram.observe` in the same process); intake ≥ 100,000 datagrams/s, none lost
at 20,000/s.
Run: python -m bench.hooks
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import time

from prometheus_client import CollectorRegistry, Histogram

from agent import hooks
from bench.common import AGENT, bench_env, table, tmpdir
from tests.cloud import free_port


def per_call(func: object, calls: int = 20000) -> float:
    """Median seconds per call, over batches of 100."""
    samples = []
    for _ in range(calls // 100):
        started = time.perf_counter()
        for _ in range(100):
            func()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) / 100)
    return statistics.median(samples)


def start_agent(tmp: object, port: int, sock: str) -> subprocess.Popen[bytes]:
    env = bench_env(tmp, TELEMETRY_STATSD=f"127.0.0.1:{port}",  # type: ignore[arg-type]
                    TELEMETRY_HOOK_SOCKET=sock, TELEMETRY_LOG_LEVEL="info")
    proc = subprocess.Popen([*AGENT], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def stop_agent(proc: subprocess.Popen[bytes]) -> dict[str, int]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return next(json.loads(line) for line in err.splitlines() if b'"agent_stopped"' in line)


def send_paced(port: int, rate: float, seconds: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    line = b"sagemaker.invocation:12.5|ms|#status:200"
    sent = 0
    started = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return sent
        due = int(elapsed * rate) if rate else sent + 200
        while sent < due:
            sock.sendto(line, ("127.0.0.1", port))
            sent += 1
        if rate:
            time.sleep(0.001)


def main() -> None:
    tmp = tmpdir()
    # 1. Hook cost, against the real agent reading the socket.
    sock_path = str(tmp / "hooks.sock")
    port = free_port()
    agent = start_agent(tmp, port, sock_path)
    os.environ["TELEMETRY_HOOK_SOCKET"] = sock_path
    hook = per_call(lambda: hooks.record(status=200, model_s=0.0125))
    histogram = Histogram("bench_latency_seconds", "bench", registry=CollectorRegistry())
    observe = per_call(lambda: histogram.observe(0.0125))
    hook_stats = stop_agent(agent)

    # 2. StatsD intake: flat out for 3 s, then paced at 20,000/s for 5 s.
    agent = start_agent(tmp, port, str(tmp / "hooks2.sock"))
    started = time.perf_counter()
    flat_sent = send_paced(port, 0, 3.0)
    flat_s = time.perf_counter() - started
    time.sleep(1.0)
    flat = stop_agent(agent)
    agent = start_agent(tmp, port, str(tmp / "hooks3.sock"))
    paced_sent = send_paced(port, 20_000, 5.0)
    time.sleep(1.0)
    paced = stop_agent(agent)

    print(f"hook datagrams received by the agent: {hook_stats['datagrams']}; "
          f"dropped by the hook: {hooks.dropped()}")
    print(table([
        ("hook call (hooks.record), median", f"{hook * 1e6:.2f} µs", "≤ 5 µs",
         f"Histogram.observe {observe * 1e6:.2f} µs", f"{hook / observe:.1f}×"),
        ("StatsD intake, one sender flat out", f"{flat['datagrams'] / flat_s:,.0f}/s",
         "≥ 100,000/s", f"sent {flat_sent / flat_s:,.0f}/s",
         f"{flat['datagrams'] / flat_sent:.1%} received"),
        ("StatsD at 20,000/s for 5 s: lost", f"{paced_sent - paced['datagrams']}", "0",
         f"sent {paced_sent}", f"{paced['datagrams'] / paced_sent:.2%} received"),
    ]))


if __name__ == "__main__":
    main()
