"""A stopped reader of the agent's stderr never stalls the agent's loggers (the event loop)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.stdio import MAX_HELD_BYTES, MAX_HELD_LINES, StdioWriter
from tests.cloud import free_port
from tests.conftest import AGENT, base_env

F_GETPIPE_SZ = 1032  # fcntl.F_GETPIPE_SZ (Linux)


def in_thread(work: Callable[[], None]) -> threading.Event:
    """Run `work` in a daemon thread; the event is set when it returns."""
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def wait_until_full(r: int, timeout: float = 10) -> None:
    """Until the pipe holds about all it can (every page in use, each possibly short of a
    line): its writer is now blocked in os.write."""
    size = fcntl.fcntl(r, F_GETPIPE_SZ)
    # A write that does not fit in the last page's room starts a new page, so with lines of
    # a few hundred bytes every page may end short by up to one line: a full 64 KiB pipe
    # was seen holding 57,749 bytes. Count a page as used at 3/4.
    full = size - (size // 4096) * 1024
    deadline = time.monotonic() + timeout
    while (held := int.from_bytes(fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"),
                                  "little")) < full:
        assert time.monotonic() < deadline, f"the pipe never filled: {held} of {size} bytes"
        time.sleep(0.005)


def read_until_eof(r: int, into: list[bytes], close: bool = True) -> threading.Event:
    def read() -> None:
        while chunk := os.read(r, 1 << 16):
            into.append(chunk)
        if close:
            os.close(r)
    return in_thread(read)


def test_logging_never_waits_for_a_relay_blocked_on_a_stopped_reader() -> None:
    """The relay thread is stuck in os.write (nobody reads stderr): 2,000 log calls still return
    at once; what does not fit is dropped and counted; once the reader resumes, every line
    arrives whole, child lines first, then the kept agent lines and one drop report."""
    r, w = os.pipe()
    writer = StdioWriter(w)
    child_line = b"c" * 99 + b"\n"
    chunk = child_line * 2000  # 200 KB: more than the pipe holds
    relayed = in_thread(lambda: writer.write_child(chunk))
    wait_until_full(r)
    assert not relayed.is_set()
    logged = in_thread(lambda: [writer.write_agent(b'{"n": %d}\n' % i) for i in range(2000)])
    assert logged.wait(5), "a log call waited for the blocked writer"
    assert writer.held_dropped == 2000 - MAX_HELD_LINES

    received: list[bytes] = []
    eof = read_until_eof(r, received)
    assert relayed.wait(10)
    assert writer.flush(10)
    os.close(w)
    assert eof.wait(10)
    lines = b"".join(received).split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert lines[:2000] == [child_line[:-1]] * 2000
    kept = [json.loads(line)["n"] for line in lines[2000:-1]]
    assert kept == list(range(2000 - MAX_HELD_LINES, 2000))  # the newest kept, in order
    report = json.loads(lines[-1])
    assert report["event"] == "agent_log_lines_dropped" and report["dropped"] == 2000 - MAX_HELD_LINES


def test_logging_alone_never_blocks_on_a_stopped_reader() -> None:
    """No child at all: log calls only queue; memory is bounded by MAX_HELD_BYTES; every
    line is accounted for, delivered whole or counted as dropped."""
    r, w = os.pipe()
    writer = StdioWriter(w)
    lines_sent = 5000
    line = b'{"event": "x", "pad": "' + b"p" * 1000 + b'", "n": %d}\n'
    logged = in_thread(lambda: [writer.write_agent(line % i) for i in range(lines_sent)])
    assert logged.wait(5), "a log call blocked on the full pipe"
    assert writer.pending_lines * len(line) <= MAX_HELD_BYTES + len(line)
    received: list[bytes] = []
    eof = read_until_eof(r, received)
    assert writer.flush(10)
    os.close(w)
    assert eof.wait(10)
    events = [json.loads(x) for x in b"".join(received).splitlines()]
    delivered = [e["n"] for e in events if e["event"] == "x"]
    dropped = sum(e["dropped"] for e in events if e["event"] == "agent_log_lines_dropped")
    assert delivered == sorted(delivered) and len(delivered) + dropped == lines_sent
    assert dropped == writer.held_dropped > 0


def test_agent_keeps_serving_while_nobody_reads_its_stderr(tmp_path: Path) -> None:
    """The real agent, its stderr a pipe nobody reads and full (the child's stderr relay is
    stuck in os.write): a log line from the event loop (SIGHUP forwarded) does not stall the
    loop, so the proxy still answers."""

    class Ping(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            """Quiet."""

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Ping)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    front = free_port()
    env = base_env(tmp_path, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{front}",
                   TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{upstream.server_address[1]}")
    child = ("import os, signal, time\nsignal.signal(signal.SIGHUP, lambda *a: None)\n"
             "os.write(1, b'ready\\n')\nos.write(2, b'e' * 99 + b'\\n' * 1)\n"
             "for _ in range(40000): os.write(2, b'e' * 99 + b'\\n')\ntime.sleep(60)\n")
    proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, "-c", child], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        wait_until_full(proc.stderr.fileno(), timeout=30)  # the relay is now stuck writing
        proc.send_signal(signal.SIGHUP)  # the loop logs `signal_forwarded`
        with urllib.request.urlopen(f"http://127.0.0.1:{front}/ping", timeout=10) as answer:  # noqa: S310
            assert answer.status == 200
    finally:
        proc.terminate()
        received: list[bytes] = []
        eof = read_until_eof(proc.stderr.fileno(), received, close=False)
        proc.wait(timeout=30)
        eof.wait(10)
        upstream.shutdown()
    lines = b"".join(received).splitlines()
    events = [json.loads(line)["event"] for line in lines if line.startswith(b"{")]
    assert "signal_forwarded" in events
    assert all(line == b"e" * 99 or line.startswith(b'{"') for line in lines)  # none split
