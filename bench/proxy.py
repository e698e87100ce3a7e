"""The agent's request proxy against nginx and haproxy as reverse proxies, and direct, in one run.

Four separate processes, all on 127.0.0.1: the upstream (nginx, 1 worker, answering a
1 KB body itself over HTTP/1.1 keep-alive), an nginx peer proxy (1 worker, upstream
keep-alive pool), a haproxy peer (nbthread 1, http-reuse always) and the agent
(`python -m agent run` with no child, dry run, per-request records on: every request is
a POST to /invocations, so the agent counts each one; its final `agent_stopped` line is
checked for that). Rows: direct (no proxy), nginx, haproxy, agent.

- CPU per request: the proxy process's own user+sys CPU (psutil; nginx: master and
  worker; every process of its tree) over a fixed-duration `wrk -t1 -c4` run, divided
  by the requests wrk completed. The direct row shows the upstream's own CPU.
- Throughput: `wrk -t2 -c32` requests/s.
- Latency: sequential requests on one keep-alive connection per row from a raw-socket
  client, interleaved in blocks across the rows (so drift hits each row alike), after a
  warm-up; added latency = the row's p50/p99 minus direct's.
- wrk's socket errors and non-2xx/3xx answers, and the client's non-200 answers and
  closed connections, are printed per row; a proxy with any is flagged and misses.

Targets (agent with records on): CPU per request ≤ 1.25× nginx's in the same run,
throughput ≥ 0.8× nginx, added latency p50 ≤ 0.1 ms and p99 ≤ 0.3 ms.
Needs Debian's nginx, haproxy and wrk.
Run: python -m bench.proxy [--duration S] [--requests N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import AGENT, bench_env, table, tmpdir
from tests.cloud import free_port

HOST = "127.0.0.1"
BODY_SIZE = 1024
ROWS = ("direct", "nginx", "haproxy", "agent")
PROXIES = ("nginx", "haproxy", "agent")
WARMUP = 500  # sequential requests per row, not timed
BLOCK = 500  # sequential requests per row per round of the interleaved latency run

# Targets, agent against nginx in the same run.
CPU_RATIO_MAX = 1.25
RPS_RATIO_MIN = 0.8
ADDED_P50_MAX_MS = 0.1
ADDED_P99_MAX_MS = 0.3

NGINX_COMMON = """
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}.body; proxy_temp_path {tmp}/{name}.proxy;
    fastcgi_temp_path {tmp}/{name}.fcgi; uwsgi_temp_path {tmp}/{name}.uwsgi;
    scgi_temp_path {tmp}/{name}.scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_buffer_size 64k;
{http}
}}
"""

UPSTREAM_HTTP = """
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        location / {{ return 200 "{answer}"; }}
    }}
"""

NGINX_PEER_HTTP = """
    upstream model {{
        server {host}:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    no log
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive 75s

frontend front
    bind {host}:{port}
    default_backend model

backend model
    server upstream {host}:{upstream}
"""

WRK_LUA = f"""wrk.method = "POST"
wrk.body = string.rep("x", {BODY_SIZE})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


class Stopped(Exception):
    """SIGTERM/SIGHUP to this script: unwind so every spawned process is stopped."""


@dataclass
class Server:
    """One spawned server process (and the processes it forks)."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM
    tree: list[psutil.Process] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """The process and its descendants (kept, so cleanup finds forked workers too)."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.popen.pid)
            known = {p.pid for p in self.tree}
            for p in [root, *root.children(recursive=True)]:
                if p.pid not in known:
                    self.tree.append(p)
        return [p for p in self.tree if p.is_running()]

    def cpu(self) -> float:
        """User+sys CPU seconds of the whole tree (its own, not reaped children's)."""
        total = 0.0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        self.processes()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for p in self.tree:  # forked workers left behind by a killed master
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " / ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""


def _die_with_parent() -> None:
    """Linux: the server gets SIGKILL if this script dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(name: str, port: int, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          stop_signal: int = signal.SIGTERM) -> Server:
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,  # noqa: S603
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_die_with_parent)  # noqa: PLW1509
    return Server(name, port, popen, log, stop_signal)


def wait_listening(server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.popen.returncode}): "
                               f"{server.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, server.port), 0.2):
            server.processes()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} not listening on {HOST}:{server.port} after "
                       f"{timeout:.0f} s: {server.log_tail()}")


# --- the sequential latency client ------------------------------------------------------

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class Client:
    """One keep-alive connection; POST /invocations with a 1 KB body, answer read fully."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = (f"POST /invocations HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                        f"Content-Type: application/octet-stream\r\n"
                        f"Content-Length: {BODY_SIZE}\r\n\r\n").encode() + b"x" * BODY_SIZE
        self.sock: socket.socket | None = None
        self.non_200 = 0
        self.closed = 0  # answers with Connection: close, or not HTTP/1.1 (not keep-alive)
        self.sent = 0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), 5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def exchange(self) -> None:
        sock = self.sock or self._connect()
        self.sock = sock
        self.sent += 1
        sock.sendall(self.request)
        recv = sock.recv
        data = recv(65536)
        while (end := data.find(b"\r\n\r\n")) < 0:
            chunk = recv(65536)
            if not chunk:
                raise ConnectionError("connection closed mid-answer")
            data += chunk
        head = data[:end]
        if head[9:12] != b"200":
            self.non_200 += 1
        length = CONTENT_LENGTH.search(head)
        if length is not None:
            need = end + 4 + int(length.group(1))
            while len(data) < need:
                chunk = recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed mid-body")
                data += chunk
        elif b"chunked" in head.lower():
            while not data.endswith(b"0\r\n\r\n"):
                chunk = recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed mid-body")
                data += chunk
        if not head.startswith(b"HTTP/1.1 ") or b"connection: close" in head.lower():
            self.closed += 1
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def latencies(clients: dict[str, Client], count: int, failed: dict[str, str]) -> dict[str, list[float]]:
    """Seconds per request for each row, interleaved in blocks, rotating the order. A row
    that takes over its time budget (a stalling or retrying proxy) is marked failed."""
    out: dict[str, list[float]] = {name: [] for name in clients}
    budget = 20.0 + count * 0.001
    spent = dict.fromkeys(clients, 0.0)
    perf = time.perf_counter

    def run(name: str, n: int, keep: bool) -> None:
        client, times = clients[name], out[name]
        began = perf()
        try:
            for _ in range(n):
                started = perf()
                client.exchange()
                if keep:
                    times.append(perf() - started)
                if started - began + spent[name] > budget:
                    failed[name] = f"latency client: over {budget:.0f} s for {client.sent} requests"
                    break
        except OSError as exc:
            failed[name] = f"latency client: {exc!r}"
        spent[name] += perf() - began

    for name in clients:
        run(name, WARMUP, keep=False)
    names = list(clients)
    for r in range(-(-count // BLOCK)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name not in failed:
                run(name, min(BLOCK, count - r * BLOCK), keep=True)
    for client in clients.values():
        client.close()
    return out


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


# --- wrk ----------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int
    rps: float
    socket_errors: dict[str, int]
    non_2xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


def wrk(port: int, script: Path, threads: int, connections: int, seconds: int) -> WrkResult:
    done = subprocess.run(  # noqa: S603
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
         f"http://{HOST}:{port}/invocations"],
        capture_output=True, text=True, check=False, timeout=seconds + 60)
    text = done.stdout
    total = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if done.returncode != 0 or total is None or rps is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or text).strip()[-300:]}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(g) for g in errors.groups()), strict=True)) if errors else {}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(int(total.group(1)), float(rps.group(1)), socket_errors,
                     int(non_2xx.group(1)) if non_2xx else 0)


# --- the run ------------------------------------------------------------------------------

def version(cmd: list[str], pattern: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)  # noqa: S603
        found = re.search(pattern, done.stdout + done.stderr)
        if found:
            return found.group(1)
    return "?"


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = version(["nginx", "-v"], r"nginx/(\S+)")
    haproxy = version(["haproxy", "-v"], r"version (\S+)")
    wrk_version = version(["wrk", "-v"], r"wrk (\S+)")
    return (f"Machine: {model}, {os.cpu_count()} cores, kernel {platform.release()}, "
            f"Python {platform.python_version()}, nginx {nginx}, HAProxy {haproxy}, "
            f"wrk {wrk_version}")


def agent_counts(log: Path) -> dict[str, Any]:
    """The agent's `agent_stopped` counters (it logs them on SIGTERM)."""
    with contextlib.suppress(OSError):
        for line in reversed(log.read_text(errors="replace").splitlines()):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "agent_stopped":
                    return event
    return {}


def start_all(tmp: Path, servers: dict[str, Server], failed: dict[str, str]) -> None:
    upstream = free_port()
    (tmp / "upstream.conf").write_text(NGINX_COMMON.format(
        tmp=tmp, name="upstream", http=UPSTREAM_HTTP.format(
            host=HOST, port=upstream, answer="y" * BODY_SIZE)))
    servers["direct"] = spawn("upstream nginx", upstream, [
        "nginx", "-p", str(tmp), "-e", str(tmp / "upstream.error.log"),
        "-c", str(tmp / "upstream.conf"), "-g", "daemon off;"], tmp / "upstream.out")
    wait_listening(servers["direct"])  # no upstream, no run: this one raises

    port = free_port()
    (tmp / "peer.conf").write_text(NGINX_COMMON.format(
        tmp=tmp, name="peer", http=NGINX_PEER_HTTP.format(host=HOST, port=port,
                                                          upstream=upstream)))
    servers["nginx"] = spawn("nginx", port, [
        "nginx", "-p", str(tmp), "-e", str(tmp / "peer.error.log"),
        "-c", str(tmp / "peer.conf"), "-g", "daemon off;"], tmp / "peer.out")

    port = free_port()
    (tmp / "haproxy.cfg").write_text(HAPROXY_CONF.format(host=HOST, port=port,
                                                         upstream=upstream))
    servers["haproxy"] = spawn("haproxy", port, ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
                               tmp / "haproxy.out")

    port = free_port()
    env = bench_env(tmp, TELEMETRY_PROXY_LISTEN=f"{HOST}:{port}",
                    TELEMETRY_PROXY_UPSTREAM=f"{HOST}:{upstream}",
                    TELEMETRY_FILE_SINK=str(tmp / "calls.jsonl"),
                    TELEMETRY_LOG_LEVEL="info")  # for its final counters
    servers["agent"] = spawn("agent", port, list(AGENT), tmp / "agent.log", env=env)

    for name in PROXIES:
        try:
            wait_listening(servers[name])
        except RuntimeError as exc:
            failed[name] = f"did not start: {exc}"


def measure(args: argparse.Namespace, tmp: Path, servers: dict[str, Server],
            failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    script = tmp / "post.lua"
    script.write_text(WRK_LUA)
    rows: dict[str, dict[str, Any]] = {name: {"sent": 0} for name in ROWS}
    live = lambda: [n for n in ROWS if n not in failed]  # noqa: E731
    upstream = servers["direct"]

    def run_wrk(name: str, threads: int, connections: int, seconds: int) -> WrkResult | None:
        try:
            result = wrk(servers[name].port, script, threads, connections, seconds)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            failed[name] = str(exc)
            return None
        rows[name]["sent"] += result.requests
        return result

    print("# warm-up", file=sys.stderr, flush=True)
    for name in live():  # fills the keep-alive pools
        run_wrk(name, 2, 32, 1)

    print(f"# latency, {args.requests} sequential requests per row", file=sys.stderr, flush=True)
    clients = {name: Client(servers[name].port) for name in live()}
    times = latencies(clients, args.requests, failed)
    for name, client in clients.items():
        rows[name]["sent"] += client.sent
        rows[name]["client_non_200"] = client.non_200
        rows[name]["client_closed"] = client.closed
        if times[name]:
            rows[name]["p50"] = pct(times[name], 0.50)
            rows[name]["p99"] = pct(times[name], 0.99)

    print(f"# CPU per request, wrk -t1 -c4 {args.duration} s per row", file=sys.stderr,
          flush=True)
    for name in live():
        own_before, up_before = servers[name].cpu(), upstream.cpu()
        result = run_wrk(name, 1, 4, args.duration)
        if result is None or result.requests == 0:
            continue
        rows[name]["cpu_us"] = (servers[name].cpu() - own_before) / result.requests * 1e6
        rows[name]["upstream_cpu_us"] = (upstream.cpu() - up_before) / result.requests * 1e6
        rows[name]["wrk_c4"] = result

    print(f"# throughput, wrk -t2 -c32 {args.duration} s per row", file=sys.stderr, flush=True)
    for name in live():
        result = run_wrk(name, 2, 32, args.duration)
        if result is not None:
            rows[name]["rps"] = result.rps
            rows[name]["wrk_c32"] = result
    return rows


def error_notes(row: dict[str, Any]) -> list[str]:
    notes = []
    for key in ("wrk_c4", "wrk_c32"):
        result: WrkResult | None = row.get(key)
        if result is not None and result.errors:
            bad = ", ".join(f"{k} {v}" for k, v in result.socket_errors.items() if v)
            notes.append(f"{key.replace('_', ' -')}: {bad + ', ' if bad else ''}"
                         f"non-2xx/3xx {result.non_2xx}")
    if row.get("client_non_200"):
        notes.append(f"latency client: {row['client_non_200']} non-200")
    if row.get("client_closed"):
        notes.append(f"latency client: {row['client_closed']} connection closes")
    return notes


def error_count(row: dict[str, Any]) -> int:
    wrk_errors = sum(r.errors for r in (row.get("wrk_c4"), row.get("wrk_c32")) if r is not None)
    return wrk_errors + row.get("client_non_200", 0) + row.get("client_closed", 0)


def report(args: argparse.Namespace, rows: dict[str, dict[str, Any]], failed: dict[str, str],
           counts: dict[str, Any]) -> None:
    ms = 1000.0
    direct = rows["direct"]

    def num(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
        return format(row[key] * scale, fmt) if key in row else "—"

    def added(name: str, key: str) -> float | None:
        if name == "direct" or key not in rows[name] or key not in direct:
            return None
        return (rows[name][key] - direct[key]) * ms

    head = ("row", "CPU µs/req (-c4)", "upstream µs/req", "req/s (-c32)", "p50 ms", "p99 ms",
            "added p50 ms", "added p99 ms", "errors")
    body = []
    for name in ROWS:
        row = rows[name]
        a50, a99 = added(name, "p50"), added(name, "p99")
        notes = error_notes(row)
        body.append((
            name + (" (FAILED)" if name in failed else " (ERRORS)" if notes else ""),
            num(row, "cpu_us", ".1f"), num(row, "upstream_cpu_us", ".1f"),
            num(row, "rps", ",.0f"), num(row, "p50", ".3f", ms), num(row, "p99", ".3f", ms),
            "—" if a50 is None else f"{a50:+.3f}", "—" if a99 is None else f"{a99:+.3f}",
            str(error_count(row)),
        ))
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    print(machine())
    print(f"Workload: POST /invocations with {BODY_SIZE} B, answer {BODY_SIZE} B from an nginx "
          f"upstream (1 worker), keep-alive. CPU: wrk -t1 -c4 {args.duration} s; req/s: wrk "
          f"-t2 -c32 {args.duration} s; latency: {args.requests} sequential requests per row "
          f"on one connection after {WARMUP} warm-up, interleaved in blocks of {BLOCK}.")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    for r in body:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for name in ROWS:
        for note in error_notes(rows[name]):
            print(f"ERRORS {name}: {note}")
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")

    agent, nginx, haproxy = rows["agent"], rows["nginx"], rows["haproxy"]

    def ratio(key: str) -> float | None:
        if key in agent and key in nginx and nginx[key] > 0:
            return float(agent[key] / nginx[key])
        return None

    cpu_ratio, rps_ratio = ratio("cpu_us"), ratio("rps")
    agent_ok = "agent" not in failed and not error_notes(agent)
    sent, counted = agent.get("sent", 0), counts.get("requests")
    proxied = counts.get("proxy_requests")
    records_on = isinstance(counted, int) and counted >= sent > 0
    if counts:
        print(f"Agent per-request records: counted {counted} requests (proxy_requests {proxied}, "
              f"upstream_errors {counts.get('proxy_upstream_errors')}) of {sent} completed by "
              f"the clients — {'on' if records_on else 'NOT all counted'}")
    else:
        print("Agent per-request records: no agent_stopped line (agent did not stop cleanly?)")

    def verdict(value: float | None, ok: bool) -> str:
        if value is None or not agent_ok:
            return "MISS (agent failed or had errors)"
        return "PASS" if ok else "MISS"

    def both(key: str, fmt: str, unit: str = "") -> str:
        return ", ".join(f"{n} {format(rows[n][key], fmt)}{unit}" for n in ("nginx", "haproxy")
                         if key in rows[n]) or "—"

    a50, a99 = added("agent", "p50"), added("agent", "p99")
    n50, h50 = added("nginx", "p50"), added("haproxy", "p50")
    n99, h99 = added("nginx", "p99"), added("haproxy", "p99")

    def fmt_ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f} ms"

    print(f"Ratios agent/nginx: CPU per request "
          f"{'—' if cpu_ratio is None else f'{cpu_ratio:.2f}×'} (target ≤ {CPU_RATIO_MAX}×), "
          f"throughput {'—' if rps_ratio is None else f'{rps_ratio:.2f}×'} "
          f"(target ≥ {RPS_RATIO_MIN}×)")
    print(table([
        ("proxy CPU per request, wrk -c4, 1 KB POST",
         f"{agent['cpu_us']:.0f} µs" if "cpu_us" in agent else "—",
         f"≤ {CPU_RATIO_MAX}× nginx", both("cpu_us", ".0f", " µs"),
         ("" if cpu_ratio is None else f"{cpu_ratio:.2f}× ")
         + verdict(cpu_ratio, cpu_ratio is not None and cpu_ratio <= CPU_RATIO_MAX)),
        ("proxy throughput, wrk -c32, 1 KB POST",
         f"{agent['rps']:,.0f} req/s" if "rps" in agent else "—",
         f"≥ {RPS_RATIO_MIN}× nginx",
         both("rps", ",.0f") + (f", direct {direct['rps']:,.0f}" if "rps" in direct else ""),
         ("" if rps_ratio is None else f"{rps_ratio:.2f}× ")
         + verdict(rps_ratio, rps_ratio is not None and rps_ratio >= RPS_RATIO_MIN)),
        ("proxy added latency p50", fmt_ms(a50), f"≤ {ADDED_P50_MAX_MS} ms",
         f"nginx {fmt_ms(n50)}, haproxy {fmt_ms(h50)}",
         verdict(a50, a50 is not None and a50 <= ADDED_P50_MAX_MS)),
        ("proxy added latency p99", fmt_ms(a99), f"≤ {ADDED_P99_MAX_MS} ms",
         f"nginx {fmt_ms(n99)}, haproxy {fmt_ms(h99)}",
         verdict(a99, a99 is not None and a99 <= ADDED_P99_MAX_MS)),
        ("proxy per-request records on", "—" if counted is None else f"{counted} counted", "= requests sent",
         f"{sent} completed", "PASS" if records_on else "MISS"),
    ]))


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5,
                        help="whole seconds of each wrk run (two per row; default 5)")
    parser.add_argument("--requests", type=int, default=10000,
                        help="timed sequential requests per row for latency (default 10000)")
    args = parser.parse_args()
    if args.duration < 1 or args.requests < 100:
        parser.error("--duration must be ≥ 1 and --requests ≥ 100")
    missing = [tool for tool in ("nginx", "haproxy", "wrk") if not shutil.which(tool)]
    if missing:
        sys.exit(f"needs Debian's nginx, haproxy and wrk; missing: {', '.join(missing)}")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    tmp = tmpdir()
    servers: dict[str, Server] = {}
    failed: dict[str, str] = {}
    try:
        start_all(tmp, servers, failed)
        rows = measure(args, tmp, servers, failed)
    except Stopped:
        print("stopped by a signal; every spawned process stopped", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return 143
    finally:
        # The agent first, by SIGTERM, so it logs its final counters; then the peers.
        for name in ("agent", "haproxy", "nginx", "direct"):
            if name in servers:
                with contextlib.suppress(Exception):
                    servers[name].stop()
    counts = agent_counts(tmp / "agent.log") if "agent" in servers else {}
    if "agent" in servers and servers["agent"].popen.returncode not in (0, None) \
            and "agent" not in failed:
        failed["agent"] = f"exited {servers['agent'].popen.returncode} on SIGTERM"
    report(args, rows, failed, counts)
    if failed:
        print(f"Logs kept in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
