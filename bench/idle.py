"""Idle cost of the agent: CPU per second and RSS with 1 s sampling and Prometheus on,
beside prometheus-node-exporter scraped every second in the same run (when installed).

Target (docs/performance.md): ≤ 1 % of one core, RSS ≤ 80 MB.
Run: python -m bench.idle [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from bench.common import bench_env, table, tmpdir

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def watch(proc: subprocess.Popen[bytes], port: int, seconds: float) -> tuple[float, float]:
    """Scrape every second for `seconds`; return (% of one core, RSS MB)."""
    time.sleep(3)  # start-up is not idle cost
    start_cpu, start = cpu_seconds(proc.pid), time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        except OSError:
            pass
        time.sleep(1)
    used = cpu_seconds(proc.pid) - start_cpu
    return used / (time.monotonic() - start) * 100, rss_mb(proc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    tmp = tmpdir()
    port = free_port()
    env = bench_env(tmp, TELEMETRY_PROMETHEUS=f"127.0.0.1:{port}", TELEMETRY_SAMPLE_INTERVAL="1",
                    TELEMETRY_INTERVAL="60", TELEMETRY_FILE_SINK=str(tmp / "calls.jsonl"))
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env)
    try:
        agent_cpu, agent_rss = watch(agent, port, args.seconds)
    finally:
        agent.terminate()
        agent.wait()
    peer = "not installed"
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter:
        port2 = free_port()
        node = subprocess.Popen([exporter, f"--web.listen-address=127.0.0.1:{port2}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            node_cpu, node_rss = watch(node, port2, args.seconds)
        finally:
            node.terminate()
            node.wait()
        peer = f"node_exporter {node_cpu:.2f} % / {node_rss:.0f} MB"
    print(table([
        ("idle CPU, 1 s sampling + 1 scrape/s (% of one core)", f"{agent_cpu:.2f}", "≤ 1 %",
         peer.split(" / ")[0], "—"),
        ("idle RSS (MB)", f"{agent_rss:.0f}", "≤ 80", peer.split(" / ")[-1], "—"),
    ]))


if __name__ == "__main__":
    main()
