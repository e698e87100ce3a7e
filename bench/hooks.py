"""Hook cost in the model's process and StatsD intake by the agent, in one run.

Targets: a hook call's median ≤ 1.5× prometheus_client `Histogram.observe` measured
in the same process and run, never blocking; a burst of 300,000 hook calls/s from 4
threads for 2 s loses no request on its way to the real agent (the hooks tally in
process and send a compact datagram per ~100 ms); StatsD intake ≥ 100,000
datagrams/s, none lost at 20,000/s.
Run: python -m bench.hooks
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import threading
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


def hook_burst(rate: float, seconds: float, threads: int) -> tuple[int, float]:
    """`threads` threads calling `hooks.record` at `rate` calls/s in all, middleware-like
    records with distinct latencies (1 µs apart); (calls made, seconds taken)."""
    made = [0] * threads
    each = rate / threads
    record = hooks.record

    def one(index: int) -> None:
        sent = 0
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * each)
            while sent < due:
                model = 0.010 + ((sent * 7919 + index) % 40_000) * 1e-6
                record(status=200 if sent % 50 else 503, model_s=model,
                       container_s=model + 0.0004)
                sent += 1
            time.sleep(0.001)
        made[index] = sent

    workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(made), time.perf_counter() - started


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
    hook_calls = 20000  # per_call's calls
    hooks.flush(5.0)
    hook_stats = stop_agent(agent)

    # 2. A burst: 300,000 hook calls/s from 4 threads for 2 s, to a fresh agent.
    burst_sock = str(tmp / "hooks-burst.sock")
    agent = start_agent(tmp, port, burst_sock)
    os.environ["TELEMETRY_HOOK_SOCKET"] = burst_sock
    dropped_before = hooks.dropped()
    burst_calls, burst_s = hook_burst(300_000, 2.0, 4)
    hooks.flush(10.0)
    time.sleep(0.5)
    burst = stop_agent(agent)
    burst_dropped = hooks.dropped() - dropped_before

    # 3. StatsD intake: flat out for 3 s, then paced at 20,000/s for 5 s.
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

    print(f"hook calls (cost): {hook_calls}, requests counted by the agent: "
          f"{hook_stats['requests']} in {hook_stats['datagrams']} datagrams; "
          f"burst: {burst_calls} calls in {burst_s:.2f} s, {burst['requests']} counted by the "
          f"agent in {burst['datagrams']} datagrams, {burst_dropped} dropped by the hooks")
    print(table([
        ("hook call (hooks.record), median", f"{hook * 1e6:.2f} µs", "≤ 1.5× observe",
         f"Histogram.observe {observe * 1e6:.2f} µs", f"{hook / observe:.2f}×"),
        ("hook burst, 4 threads: requests lost", f"{burst_calls - burst['requests']}", "0",
         f"sent {burst_calls} ({burst_calls / burst_s:,.0f}/s)",
         f"{burst['requests'] / max(1, burst_calls):.2%} received"),
        ("StatsD intake, one sender flat out", f"{flat['datagrams'] / flat_s:,.0f}/s",
         "≥ 100,000/s", f"sent {flat_sent / flat_s:,.0f}/s",
         f"{flat['datagrams'] / flat_sent:.1%} received"),
        ("StatsD at 20,000/s for 5 s: lost", f"{paced_sent - paced['datagrams']}", "0",
         f"sent {paced_sent}", f"{paced['datagrams'] / paced_sent:.2%} received"),
    ]))


if __name__ == "__main__":
    main()
