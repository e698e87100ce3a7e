"""The request proxy against a direct connection and nginx as a reverse proxy, in one run.

DESIGN §9: added latency over direct with 1 KB bodies and keep-alive (p50 ≤ 0.2 ms,
p99 ≤ 0.6 ms), CPU per proxied request (≤ 100 µs), throughput with wrk (≥ nginx).
The upstream is nginx answering 1 KB itself, so the upstream costs the same in
every row. Needs Debian's nginx and wrk.
Run: python -m bench.proxy [--requests N]
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.common import AGENT, bench_env, table, tmpdir
from tests.cloud import free_port

BODY = b"x" * 1024

NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream model {{ server 127.0.0.1:{upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{upstream};
        location / {{ client_body_buffer_size 64k; return 200 "{answer}"; }}
    }}
    server {{
        listen 127.0.0.1:{front};
        location / {{
            proxy_pass http://model; proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def latencies(port: int, count: int) -> list[float]:
    """Seconds per POST /invocations with a 1 KB body on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for _ in range(count + 200):
        started = time.perf_counter()
        conn.request("POST", "/invocations", body=BODY)
        conn.getresponse().read()
        out.append(time.perf_counter() - started)
    conn.close()
    return out[200:]  # warm-up


def wrk(port: int) -> float:
    script = Path(tmpdir()) / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = string.rep("x", 1024)\n')
    done = subprocess.run(["wrk", "-t1", "-c32", "-d5s", "-s", str(script),
                           f"http://127.0.0.1:{port}/invocations"],
                          capture_output=True, text=True, check=True)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    if not (shutil.which("nginx") and shutil.which("wrk")):
        sys.exit("needs Debian's nginx and wrk")
    tmp = tmpdir()
    upstream, nginx_front, agent_front = free_port(), free_port(), free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, front=nginx_front,
                                      answer="y" * 1024))
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"],
                             stderr=subprocess.DEVNULL)
    env = bench_env(tmp, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{agent_front}",
                    TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{upstream}")
    agent = subprocess.Popen([*AGENT], env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        direct = latencies(upstream, args.requests)
        via_nginx = latencies(nginx_front, args.requests)
        ps = psutil.Process(agent.pid)
        cpu_before = sum(ps.cpu_times()[:2])
        via_agent = latencies(agent_front, args.requests)
        cpu_per_request = (sum(ps.cpu_times()[:2]) - cpu_before) / (args.requests + 200)
        rps = {"direct": wrk(upstream), "nginx": wrk(nginx_front), "agent": wrk(agent_front)}
        nginx_ps = [p for p in psutil.Process(nginx.pid).children()] or [psutil.Process(nginx.pid)]
        cpu_nginx_before = sum(sum(p.cpu_times()[:2]) for p in nginx_ps)
        latencies(nginx_front, args.requests)
        # nginx's worker serves both the front and the upstream: half its CPU is the proxy's.
        cpu_nginx = (sum(sum(p.cpu_times()[:2]) for p in nginx_ps) - cpu_nginx_before) / (
            args.requests + 200)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(30)
    ms = 1000.0
    add50 = (pct(via_agent, 0.5) - pct(direct, 0.5)) * ms
    add99 = (pct(via_agent, 0.99) - pct(direct, 0.99)) * ms
    ng50 = (pct(via_nginx, 0.5) - pct(direct, 0.5)) * ms
    ng99 = (pct(via_nginx, 0.99) - pct(direct, 0.99)) * ms
    print(f"{args.requests} sequential POSTs of 1 KB, keep-alive; direct p50 "
          f"{pct(direct, 0.5) * ms:.3f} ms, p99 {pct(direct, 0.99) * ms:.3f} ms")
    print(table([
        ("proxy added latency p50", f"{add50:.3f} ms", "≤ 0.2 ms", f"nginx {ng50:.3f} ms",
         f"{add50 / ng50:.2f}×" if ng50 > 0 else "—"),
        ("proxy added latency p99", f"{add99:.3f} ms", "≤ 0.6 ms", f"nginx {ng99:.3f} ms",
         f"{add99 / ng99:.2f}×" if ng99 > 0 else "—"),
        ("proxy CPU per request", f"{cpu_per_request * 1e6:.0f} µs", "≤ 100 µs",
         f"nginx ≈ {cpu_nginx * 1e6 / 2:.0f} µs (half its worker)", "—"),
        ("throughput, wrk -c32, 1 KB POST", f"{rps['agent']:,.0f} req/s", "≥ nginx",
         f"nginx {rps['nginx']:,.0f} (direct {rps['direct']:,.0f})",
         f"{rps['agent'] / rps['nginx']:.2f}×"),
    ]))


if __name__ == "__main__":
    main()
