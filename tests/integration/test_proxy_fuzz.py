"""A hypothesis fuzz of the request proxy: client bytes against upstream behaviours.

One agent process (`python -m agent run`, proxy only) runs in front of an upstream of
the test's own (a raw-socket server in threads, below). Hypothesis draws, per example,
a few client connections at once; each sends a few requests (keep-alive, pipelined in
one write or one at a time, cut into random pieces, HTTP/1.0 or 1.1, Content-Length or
chunked bodies, Expect: 100-continue, hop-by-hop and other extra headers) and ends by
closing, idling, stalling mid-request, aborting or sending garbage. Each request names
in its target what the upstream does with it (`mode`: a Content-Length answer, chunked
with trailers, close-delimited, 103 or 100 before the answer, an answer before the body
is read, close without an answer, death mid-body, slowness, silence past the timeout,
204/304, `Connection: close`, a keep-alive connection dropped just after).

Every request carries an id (target, `X-Id`, and its body is `id=<id>;` repeated), and
so does every answer (`X-Id`, body, trailer). The properties, one exception class each
so that hypothesis reports (and shrinks) each kind of failure on its own:

- `AgentCrashed`: the process stays up, logs no traceback, and answers control requests
  (as many at once as the upstream holds idle connections, so a stale answer left in
  the proxy's pool is found in the example that left it);
- `MixedAnswers`: a client only ever receives its own ids, in request order (1xx may
  precede a final answer; the proxy's own 4xx/5xx carries no id);
- `Hang`: a connection completes or the agent closes it within its timeouts + MARGIN;
- `UpstreamAbuse`: the upstream receives each id once (twice only when the first try
  went on a reused connection the upstream closed without answering: the stale
  keep-alive retry), and each request's bytes whole and its own;
- `DroppedRequest`: a valid request is answered unless something before it on its
  connection (an upstream failure, `Connection: close`, HTTP/1.0) excused the close;
- `ProtocolViolation`: answers are well-formed HTTP/1.1 for the request they answer.

Knobs: PROXY_FUZZ_EXAMPLES (default 50), PROXY_FUZZ_SHRINK_S (seconds of shrinking,
default 120; 0 reports the first failing example unshrunk), PROXY_FUZZ_ONLY (failure
classes to report, comma-separated, to look past a known one).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.cloud import free_port
from tests.conftest import AGENT, base_env

pytestmark = pytest.mark.timeout(900)

TIMEOUT_S = 1.0  # every proxy timeout the agent is given
TIMEOUT_ENV = {f"TELEMETRY_PROXY_{name}": "1" for name in (
    "TIMEOUT", "CONNECT_TIMEOUT", "CLIENT_HEADER_TIMEOUT", "CLIENT_BODY_TIMEOUT",
    "SEND_TIMEOUT", "KEEPALIVE_TIMEOUT")}
MARGIN_S = 2.5  # scheduling slack on a loaded machine
HANG_S = TIMEOUT_S + MARGIN_S  # the longest the agent may leave a waiting client without a byte
UPSTREAM_IO_S = 20.0
EXAMPLES = int(os.environ.get("PROXY_FUZZ_EXAMPLES", "50"))
SHRINK_S = int(os.environ.get("PROXY_FUZZ_SHRINK_S", "120"))
ONLY = set(filter(None, os.environ.get("PROXY_FUZZ_ONLY", "").split(",")))

if SHRINK_S:  # hypothesis' own cap is 300 s; a failing example here may take seconds each
    from hypothesis.internal.conjecture import engine as _engine
    if hasattr(_engine, "MAX_SHRINKING_SECONDS"):
        _engine.MAX_SHRINKING_SECONDS = SHRINK_S


# -- the failures, one class per property ---------------------------------------------------

class FuzzFailure(AssertionError):
    pass


class AgentCrashed(FuzzFailure):
    pass


class MixedAnswers(FuzzFailure):
    pass


class UpstreamAbuse(FuzzFailure):
    pass


class Hang(FuzzFailure):
    pass


class DroppedRequest(FuzzFailure):
    pass


class ProtocolViolation(FuzzFailure):
    pass


SEVERITY = [AgentCrashed, MixedAnswers, UpstreamAbuse, Hang, DroppedRequest, ProtocolViolation]


def tag(rid: str) -> bytes:
    return b"id=%b;" % rid.encode()


def tagged(rid: str, size: int) -> bytes:
    """`size` bytes of `id=<rid>;` repeated (the last one cut)."""
    unit = tag(rid)
    return (unit * (size // len(unit) + 1))[:size]


def foreign_ids(data: bytes, rid: str) -> set[str]:
    return {m.decode(errors="replace") for m in re.findall(rb"id=([^;&\s]{1,40});", data)} - {rid}


def short(data: bytes, limit: int = 160) -> str:
    return repr(data if len(data) <= limit else data[:limit] + b"...")


# -- the upstream ----------------------------------------------------------------------------

# Modes after which the upstream closes or fails: what follows on that client connection
# may legitimately go unanswered.
DISRUPTIVE = frozenset({"eof", "early", "early_close", "close", "die", "hang", "conn_close"})


@dataclass
class Receipt:
    conn: int
    index: int  # 0: the first request on that upstream connection
    answered: bool = False  # any byte of an answer was sent


class _Closed(Exception):
    pass


class _SockReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        self.buf += data

    def until(self, sep: bytes, limit: int = 200_000) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if len(self.buf) > limit:
                raise ValueError(f"no {sep!r} in {limit} bytes")
            self._more()
        out = bytes(self.buf[:i])
        del self.buf[:i + len(sep)]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class Upstream:
    """A model server of the test's own: what it does with each request is in the request."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Condition()
        self.receipts: dict[str, list[Receipt]] = {}
        self.violations: list[str] = []
        self.idle: set[int] = set()
        self.ctl_expected = 0
        self.ctl_arrived = 0
        self._serial = itertools.count()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, next(self._serial)),
                             daemon=True).start()

    def _violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def _serve(self, sock: socket.socket, serial: int) -> None:
        sock.settimeout(UPSTREAM_IO_S)
        reader = _SockReader(sock)
        try:
            for index in itertools.count():
                with self.lock:
                    if not reader.buf:
                        self.idle.add(serial)
                try:
                    head = reader.until(b"\r\n\r\n")
                finally:
                    with self.lock:
                        self.idle.discard(serial)
                if not self._one(sock, reader, head, serial, index):
                    self._drain(sock, reader, serial, index + 1)
                    return
        except (_Closed, OSError):
            pass
        except ValueError as exc:
            self._violation(f"upstream could not parse what it got: {exc}")
        finally:
            sock.close()

    def _drain(self, sock: socket.socket, reader: _SockReader, serial: int, index: int) -> None:
        """Before a close of ours: count the requests sent after the one we answered last
        (a proxy must not pipeline them; a retry loop would)."""
        data = bytearray(reader.buf)
        deadline = time.monotonic() + 0.5
        try:
            sock.settimeout(0.05)
            while time.monotonic() < deadline and len(data) < 4 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        with self.lock:
            for rid in re.findall(rb"(?i)\r\nx-id: *([^\r\n]*)\r\n", data):
                self.receipts.setdefault(rid.decode(errors="replace"), []).append(
                    Receipt(serial, index))

    def _one(self, sock: socket.socket, reader: _SockReader, head: bytes, serial: int,
             index: int) -> bool:
        """Read and answer one request; False when the connection is to close."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._violation(f"upstream got a bad request line: {short(head)}")
            return False
        method, target, version = parts[0].decode(), parts[1].decode(errors="replace"), parts[2]
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                self._violation(f"upstream got a bad header line {short(line)} in {short(head)}")
                return False
            headers.append((name.strip().lower(), value.strip()))
        q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        rid = q.get("id")
        if rid is None:  # a valid request of no client's (a garbage tail may begin like one)
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            return False
        receipt = Receipt(serial, index)
        with self.lock:
            self.receipts.setdefault(rid, []).append(receipt)
        hvals = {n: [v for k, v in headers if k == n] for n in
                 ("x-id", "content-length", "transfer-encoding", "expect", "connection")}
        if hvals["x-id"] != [rid]:
            self._violation(f"{rid}: upstream got X-Id {hvals['x-id']} in {short(head)}")
        mode = q.get("mode", "cl")
        connection = ",".join(hvals["connection"]).lower()
        closes = "close" in connection or (
            version == b"HTTP/1.0" and "keep-alive" not in connection)
        send = self._sender(sock, receipt)
        if mode in ("early", "early_close"):  # the answer goes before the body is read
            keep = self._answer(send, method, version, rid, mode, q)
            if mode == "early_close":
                sock.shutdown(socket.SHUT_WR)
                return False
            return self._body(reader, rid, q, hvals) and keep and not closes
        if hvals["expect"] and mode != "close":
            send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self._body(reader, rid, q, hvals):
            return False
        if mode == "ctl":
            with self.lock:
                self.ctl_arrived += 1
                self.lock.notify_all()
                self.lock.wait_for(lambda: self.ctl_arrived >= self.ctl_expected, timeout=0.5)
        return self._answer(send, method, version, rid, mode, q) and not closes

    def _body(self, reader: _SockReader, rid: str, q: dict[str, str],
              hvals: dict[str, list[str]]) -> bool:
        """Read the request body and check it is this request's, whole."""
        want = tagged(rid, int(q.get("blen", "0")))
        te, cl = hvals["transfer-encoding"], hvals["content-length"]
        if te:
            if te != ["chunked"] or cl:
                self._violation(f"{rid}: upstream got Transfer-Encoding {te} / Content-Length {cl}")
                return False
            body = bytearray()
            while True:
                size = int(reader.until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while reader.until(b"\r\n"):  # trailers
                        pass
                    break
                body += reader.exact(size)
                if reader.exact(2) != b"\r\n":
                    self._violation(f"{rid}: upstream got a chunk without CRLF")
                    return False
            got = bytes(body)
        elif len(set(cl)) > 1 or (cl and not cl[0].isdigit()):
            self._violation(f"{rid}: upstream got Content-Length {cl}")
            return False
        else:
            got = reader.exact(int(cl[0])) if cl else b""
        if got != want:
            self._violation(f"{rid}: upstream got a body of {len(got)} bytes, not its own "
                            f"{len(want)}; other ids in it: {sorted(foreign_ids(got, rid))}; "
                            f"{short(got)}")
            return False
        return True

    @staticmethod
    def _sender(sock: socket.socket, receipt: Receipt) -> Any:
        def send(data: bytes) -> None:
            receipt.answered = True
            sock.sendall(data)
        return send

    def _answer(self, send: Any, method: str, version: bytes, rid: str, mode: str,
                q: dict[str, str]) -> bool:
        """Send the answer `mode` asks for; False when the connection is to close."""
        n, ms = int(q.get("n", "0")), int(q.get("ms", "0")) / 1000
        body = tag(rid) * n
        head_only = method == "HEAD"
        idh = b"X-Id: " + rid.encode()

        def head(status: bytes, *extra: bytes) -> None:
            send(b"\r\n".join([b"HTTP/1.1 " + status, idh, *extra]) + b"\r\n\r\n")

        if mode == "close":
            return False
        if mode == "hang":
            time.sleep(HANG_S + 1)
            return False
        if mode == "s204":
            head(b"204 No Content")
            return True
        if mode == "s304":
            head(b"304 Not Modified", b'ETag: "v1"', b"Content-Length: %d" % len(body))
            return True
        if mode == "e103":
            for _ in range(int(q.get("hints", "1"))):
                head(b"103 Early Hints", b"Link: </style.css>; rel=preload")
        if mode == "e100":
            send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if mode == "chunked" and version == b"HTTP/1.1":
            sizes = [int(s) for s in q.get("cs", "7").split(".")]
            trailers = q.get("tr") == "1"
            head(b"200 OK", b"Transfer-Encoding: chunked",
                 *([b"Trailer: X-Trailer-Id"] if trailers else []))
            if head_only:
                return True
            pos = 0
            for count, size in enumerate(itertools.cycle(sizes)):
                if pos >= len(body):
                    break
                piece = body[pos:pos + size]
                pos += size
                send(b"%x;ext=1\r\n%b\r\n" % (len(piece), piece) if size % 3 == 0 else
                     b"%x\r\n%b\r\n" % (len(piece), piece))
                if ms and count < 3:  # a streamed start, then the rest at once
                    time.sleep(ms)
            send(b"0\r\n" + (b"X-Trailer-Id: %b\r\n" % rid.encode() if trailers else b"")
                 + b"\r\n")
            return True
        if mode == "eof":
            head(b"200 OK")
            if not head_only:
                send(body)
            return False
        if mode == "die":
            head(b"200 OK", b"Content-Length: %d" % (len(body) + 100))
            if not head_only:
                send(body[:len(body) // 2])
            return False
        if mode == "slow":
            time.sleep(ms)
        closing = mode in ("conn_close", "early_close")
        head(b"200 OK", b"Content-Length: %d" % len(body),
             *([b"Connection: close"] if closing else []))
        if not head_only:
            if mode == "slow":
                time.sleep(ms)
                send(body[:len(body) // 2])
                time.sleep(ms)
                send(body[len(body) // 2:])
            else:
                send(body)
        if mode == "ka_drop":  # keep-alive promised, then dropped: a stale pooled connection
            time.sleep(ms)
            return False
        return not closing


# -- the agent -------------------------------------------------------------------------------

class FuzzAgent:
    """`python -m agent run` with the proxy only, its stderr in a file."""

    def __init__(self, tmp: Path, upstream: int) -> None:
        self.tmp, self.upstream = tmp, upstream
        self.log = tmp / "agent-stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_pos = 0
        self.start()

    def start(self) -> None:
        self.port = free_port()
        env = base_env(self.tmp, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{self.port}",
                       TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{self.upstream}", **TIMEOUT_ENV)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([*AGENT, "run"], env=env, stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.alive():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the agent did not start: {self.log.read_bytes()[-2000:]!r}")
        self.log_pos = self.log.stat().st_size

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def new_log(self) -> bytes:
        data = self.log.read_bytes()
        out, self.log_pos = data[self.log_pos:], len(data)
        return out

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def restart(self) -> None:
        """After a failed example: a fresh process, so no state leaks into the next one."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self.start()


# -- what hypothesis draws -------------------------------------------------------------------

MODES = ["cl", "cl", "cl", "chunked", "chunked", "chunked", "eof", "e103", "e100", "early",
         "early_close", "close", "die", "slow", "hang", "s204", "s304", "conn_close", "ka_drop"]
EXTRA_HEADERS = [
    ("Keep-Alive", "timeout=5, max=100"), ("TE", "trailers"), ("Trailer", "X-Client-Trailer"),
    ("Proxy-Connection", "keep-alive"), ("Connection", "X-Hop"), ("X-Hop", "drop-me"),
    ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("X-Forwarded-For", "10.0.0.1"), ("Content-Type", "application/json"),
    ("Accept-Encoding", "gzip"), ("X-Pad", "p" * 3000), ("x-MiXeD-case", "v"),
]
GARBAGE = [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /x HTTP/1.1\r\nX: a\x00b\r\n\r\n",
]


class _Compact:
    """A repr that leaves out fields at their default, for readable falsifying examples."""

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value != f.default:
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' printer
        printer.text(repr(self))


@dataclass(repr=False)
class Req(_Compact):
    mode: str = "cl"
    method: str = "POST"
    version: str = "1.1"
    n: int = 3  # the answer body: `id=<id>;` n times
    blen: int = 0  # request body bytes
    body_chunks: tuple[int, ...] = ()  # chunked request body with these chunk sizes
    expect: bool = False
    connection: str = ""
    extra: tuple[tuple[str, str], ...] = ()
    answer_chunks: tuple[int, ...] = (7,)
    trailers: bool = False
    ms: int = 0
    hints: int = 1

    def closes(self) -> bool:
        return self.connection == "close" or (self.version == "1.0" and
                                              self.connection != "keep-alive")

    def encode(self, rid: str) -> tuple[bytes, bytes]:
        query = (f"id={rid}&mode={self.mode}&n={self.n}&blen={self.blen}&ms={self.ms}"
                 f"&cs={'.'.join(map(str, self.answer_chunks))}&tr={int(self.trailers)}"
                 f"&hints={self.hints}")
        lines = [f"{self.method} /invocations?{query} HTTP/{self.version}", "Host: model",
                 f"X-Id: {rid}"]
        body = tagged(rid, self.blen)
        if self.body_chunks:
            lines.append("Transfer-Encoding: chunked")
            out, pos = bytearray(), 0
            for size in itertools.cycle(self.body_chunks):
                if pos >= len(body):
                    break
                piece = body[pos:pos + size]
                pos += size
                out += b"%x\r\n%b\r\n" % (len(piece), piece)
            out += b"0\r\nX-Client-Trailer: 1\r\n\r\n" if self.trailers else b"0\r\n\r\n"
            body = bytes(out)
        elif self.method == "POST":
            lines.append(f"Content-Length: {self.blen}")
        if self.expect:
            lines.append("Expect: 100-continue")
        if self.connection:
            lines.append(f"Connection: {self.connection}")
        lines += [f"{k}: {v}" for k, v in self.extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode(), body


@dataclass(repr=False)
class ConnPlan(_Compact):
    reqs: list[Req] = field(default_factory=list)
    pipeline: bool = False
    pieces: tuple[int, ...] = ()  # writes are cut into pieces of these sizes (cycled)
    gap_ms: int = 0
    ending: str = "close"  # close | idle | stall | abort | garbage
    garbage: bytes = b""
    cut: int = 0  # where a stall or abort cuts the bytes


@st.composite
def requests(draw: Any) -> Req:
    mode = draw(st.sampled_from(MODES))
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0"]))
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "HEAD"]))
    req = Req(mode=mode, method=method, version=version)
    req.n = draw(st.sampled_from([3, 0, 1, 2, 5, 10, 40, 40, 3000, 30000]))
    if method == "POST":
        req.blen = draw(st.sampled_from([0, 1, 5, 12, 40, 100, 300, 1000, 70000]))
        if version == "1.1" and draw(st.booleans()):
            req.body_chunks = tuple(draw(st.lists(st.integers(1, 64), min_size=1, max_size=3)))
        req.expect = version == "1.1" and req.blen > 0 and draw(st.integers(0, 3)) == 0
    req.connection = draw(st.sampled_from(["", "", "", "", "close", "keep-alive"]))
    req.extra = tuple(draw(st.lists(st.sampled_from(EXTRA_HEADERS), max_size=3, unique=True)))
    if mode == "chunked":
        req.answer_chunks = tuple(draw(st.lists(st.integers(1, 80), min_size=1, max_size=3)))
        req.trailers = draw(st.booleans())
    if mode in ("slow", "ka_drop") or (mode == "chunked" and draw(st.integers(0, 4)) == 0):
        req.ms = draw(st.sampled_from([0, 5, 30, 150]))
    if mode == "e103":
        req.hints = draw(st.integers(1, 2))
    if req.body_chunks:
        req.trailers = draw(st.booleans()) if mode != "chunked" else req.trailers
    return req


@st.composite
def connections(draw: Any) -> ConnPlan:
    plan = ConnPlan(reqs=draw(st.lists(requests(), min_size=1, max_size=4)))
    plan.pipeline = draw(st.booleans())
    plan.pieces = tuple(draw(st.lists(st.integers(1, 300), max_size=4)))
    plan.gap_ms = draw(st.sampled_from([0, 0, 1, 20]))
    plan.ending = draw(st.sampled_from(["close"] * 7 + ["idle", "stall", "abort", "garbage"]))
    if plan.ending == "garbage":
        plan.garbage = draw(st.sampled_from(GARBAGE) | st.binary(min_size=1, max_size=30))
    if plan.ending in ("stall", "abort"):
        plan.cut = draw(st.integers(0, 10_000))
    return plan


# -- the client side -------------------------------------------------------------------------

class Unparseable(Exception):
    pass


class Wire:
    """Buffered reads from the agent; TimeoutError when it stays silent for `idle_s`."""

    def __init__(self, reader: asyncio.StreamReader, idle_s: float) -> None:
        self.reader, self.idle_s = reader, idle_s
        self.buf = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await asyncio.wait_for(self.reader.read(65536), self.idle_s)
        except TimeoutError:  # an OSError too: not a close
            raise
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def line(self) -> bytes | None:
        while (i := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > 70_000:
                raise Unparseable(bytes(self.buf))
            if not await self.fill():
                return None
        out = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return out

    async def exact(self, n: int) -> bytes:
        while len(self.buf) < n and await self.fill():
            pass
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def rest(self) -> bytes:
        while await self.fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


@dataclass
class Resp:
    status: int
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = True
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def values(self, name: bytes, trailers: bool = False) -> list[bytes]:
        return [v for k, v in (self.trailers if trailers else self.headers) if k == name]

    def tokens(self, name: bytes) -> set[bytes]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(b",")}

    def short(self) -> str:
        ids = [v.decode(errors="replace") for v in self.values(b"x-id")]
        shown = ids[:3] + ([f"... {len(ids)} in all"] if len(ids) > 3 else [])
        return (f"{self.status} X-Id={shown} body={short(self.body, 60)}"
                f"{'' if self.complete else ' (cut)'}")


async def read_response(wire: Wire, no_body: bool) -> Resp | None:
    """The next response; None when the agent closed the connection between responses."""
    first = await wire.line()
    if first is None:
        if wire.buf:
            raise Unparseable(bytes(wire.buf))
        return None
    m = re.fullmatch(rb"HTTP/(1\.[01]) (\d{3})(?: .*)?", first)
    if not m:
        raise Unparseable(first + b"\r\n" + bytes(wire.buf[:200]))
    resp = Resp(int(m[2]), m[1], [])
    while (line := await wire.line()) != b"":
        if line is None:
            resp.complete = False
            return resp
        name, sep, value = line.partition(b":")
        if not sep:
            raise Unparseable(line)
        resp.headers.append((name.strip().lower(), value.strip()))
    if resp.status < 200 or no_body or resp.status in (204, 304):
        return resp
    lengths = set(resp.values(b"content-length"))
    if b"chunked" in resp.tokens(b"transfer-encoding"):
        body = bytearray()
        while True:
            size_line = await wire.line()
            if size_line is None:
                resp.complete = False
                break
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise Unparseable(b"chunk size " + size_line) from None
            if size == 0:
                while (trailer := await wire.line()) != b"":
                    if trailer is None:
                        resp.complete = False
                        break
                    name, _, value = trailer.partition(b":")
                    resp.trailers.append((name.strip().lower(), value.strip()))
                break
            data = await wire.exact(size)
            body += data
            end = await wire.exact(2)
            if len(data) < size or len(end) < 2:
                resp.complete = False
                break
            if end != b"\r\n":
                raise Unparseable(b"chunk end " + end)
        resp.body = bytes(body)
    elif lengths:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise Unparseable(b"Content-Length %r" % sorted(lengths))
        size = int(next(iter(lengths)))
        resp.body = await wire.exact(size)
        resp.complete = len(resp.body) == size
    else:
        resp.body = await wire.rest()
    return resp


def ends_connection(req: Req, resp: Resp) -> bool:
    """The exchange ends the connection: a close asked for or announced, or a cut answer.
    (An HTTP/1.0 request without keep-alive only excuses a close: llhttp, for one, reads
    `Proxy-Connection: keep-alive` as keep-alive, and the answer is HTTP/1.1.)"""
    tokens = resp.tokens(b"connection")
    return req.connection == "close" or b"close" in tokens or not resp.complete or (
        resp.version == b"1.0" and b"keep-alive" not in tokens)


def final_status(req: Req) -> int:
    return {"s204": 204, "s304": 304}.get(req.mode, 200)


def check(req: Req, rid: str, resp: Resp) -> list[tuple[type[FuzzFailure], str]]:
    """What is wrong with `resp` as (part of) the answer to request `rid`."""
    out: list[tuple[type[FuzzFailure], str]] = []
    ids = [v.decode(errors="replace") for v in resp.values(b"x-id")]
    strangers = foreign_ids(resp.body, rid) | (set(ids) - {rid})
    strangers |= {v.decode(errors="replace") for v in resp.values(b"x-trailer-id", True)} - {rid}
    if strangers:
        out.append((MixedAnswers, f"request {rid} got an answer with ids {sorted(strangers)}: "
                                  f"{resp.short()}"))
        return out
    if resp.status < 200:
        if resp.status == 101:
            out.append((ProtocolViolation, f"{rid}: 101 Switching Protocols, never asked for"))
        return out
    if req.version == "1.0" and b"chunked" in resp.tokens(b"transfer-encoding"):
        out.append((ProtocolViolation, f"{rid}: a chunked answer to an HTTP/1.0 request"))
    if not ids:
        if resp.status < 400:
            out.append((MixedAnswers, f"{rid}: a {resp.status} answer without an id: "
                                      f"{resp.short()}"))
        return out
    if len(ids) > 1:
        out.append((ProtocolViolation, f"{rid}: X-Id repeated {ids}"))
    if resp.status != final_status(req):
        out.append((MixedAnswers, f"{rid} ({req.mode}): status {resp.status}, the upstream sent "
                                  f"{final_status(req)}"))
    want = b"" if req.method == "HEAD" or resp.status in (204, 304) else tag(rid) * req.n
    if resp.complete and resp.body != want:
        out.append((MixedAnswers, f"{rid} ({req.mode}): a whole body ({len(resp.body)} bytes) "
                                  f"that is not the upstream's ({len(want)}): {resp.short()}"))
    elif not resp.complete and not want.startswith(resp.body):
        out.append((MixedAnswers, f"{rid}: a cut body that is not the upstream's: {resp.short()}"))
    return out


@dataclass
class ConnResult:
    index: int
    plan: ConnPlan
    rids: list[str]
    finals: dict[int, Resp] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # a transcript, for failure messages
    problems: list[tuple[type[FuzzFailure], str]] = field(default_factory=list)
    closed_by_agent: bool = False
    closing: bool = False  # an exchange ended the connection
    hung: bool = False

    def problem(self, kind: type[FuzzFailure], text: str) -> None:
        self.problems.append((kind, f"conn {self.index}: {text}"))


def abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def run_conn(port: int, index: int, plan: ConnPlan, rids: list[str]) -> ConnResult:
    res = ConnResult(index, plan, rids)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    wire = Wire(reader, HANG_S)
    progress = [asyncio.Event() for _ in rids]
    finished = [asyncio.Event() for _ in rids]
    reqs = plan.reqs
    aborted = False
    stall_rid = rids[-1] + "s"
    stall_head, stall_body = Req(blen=50).encode(stall_rid)

    def release_all() -> None:
        for ev in progress + finished:
            ev.set()

    async def send(data: bytes) -> None:
        pieces = iter(plan.pieces)  # then the rest in one write
        pos = 0
        while pos < len(data):
            size = next(pieces, len(data))
            writer.write(data[pos:pos + size])
            pos += size
            await asyncio.wait_for(writer.drain(), HANG_S)
            if plan.gap_ms and pos < len(data):
                await asyncio.sleep(plan.gap_ms / 1000)

    def tail() -> bytes:
        if plan.ending == "garbage":
            return plan.garbage
        if plan.ending == "stall":
            whole = stall_head + stall_body
            return whole[:1 + plan.cut % (len(whole) - 1)]
        return b""

    async def write_all() -> None:
        nonlocal aborted
        try:
            if plan.pipeline:
                data = b"".join(b"".join(r.encode(rid)) for r, rid in zip(reqs, rids)) + tail()
                if plan.ending == "abort":
                    data = data[:1 + plan.cut % len(data)]
                await send(data)
                if plan.ending == "abort":
                    aborted = True
                    abort(writer)
                return
            for k, (req, rid) in enumerate(zip(reqs, rids)):
                head, body = req.encode(rid)
                if req.expect and body:
                    await send(head)
                    try:
                        await asyncio.wait_for(progress[k].wait(), 0.3)
                    except TimeoutError:
                        pass
                    if wire.eof:
                        return
                    await send(body)
                else:
                    await send(head + body)
                if plan.ending == "abort" and k == len(reqs) - 1:
                    await asyncio.sleep(plan.cut % 50 / 1000)
                    aborted = True
                    abort(writer)
                    return
                await finished[k].wait()
                if wire.eof or res.hung or res.closing:
                    return
            await send(tail())
        except TimeoutError:
            res.hung = True
            res.problem(Hang, f"the agent stopped reading our request bytes for {HANG_S} s")
            wire.eof = True
            release_all()
        except (ConnectionError, OSError):
            pass

    async def closing_tail(k: int) -> None:
        """After an exchange that ends the connection: nothing more of ours, then a close."""
        res.closing = True
        wire.idle_s = TIMEOUT_S + MARGIN_S
        rest = await wire.rest()
        res.closed_by_agent = True
        if rest:
            res.seen.append(f"after the close<-{short(rest, 60)}")
        later = set(rids[k + 1:]) | {stall_rid}
        if others := foreign_ids(rest, "") - later:
            res.problem(MixedAnswers, f"ids {sorted(others)} after {rids[k]}'s answer, which "
                                      f"ended the connection: {short(rest)}")
        elif answered := foreign_ids(rest, "") & later:
            res.problem(ProtocolViolation, f"{sorted(answered)} answered after {rids[k]}'s "
                                           f"exchange ended the connection")

    async def read_all() -> None:
        current, where = rids[0], ""
        try:
            for k, (req, rid) in enumerate(zip(reqs, rids)):
                current, where = rid, f"where {rid}'s answer should begin"
                while True:
                    resp = await read_response(wire, no_body=req.method == "HEAD")
                    if resp is None:
                        res.closed_by_agent = not aborted
                        return
                    res.seen.append(f"{rid}<-{resp.short()}")
                    for kind, text in check(req, rid, resp):
                        res.problem(kind, text)
                    progress[k].set()
                    if resp.status >= 200:
                        res.finals[k] = resp
                        finished[k].set()
                        break
                if ends_connection(req, resp):
                    await closing_tail(k)
                    return
            # After the planned answers: only the proxy's own errors, or the stalled request's.
            if plan.ending == "close":  # a short look for bytes nobody asked for, then we close
                try:
                    if not wire.buf and not await asyncio.wait_for(wire.fill(), 0.05):
                        res.closed_by_agent = True
                        return
                except TimeoutError:
                    return
            wire.idle_s = TIMEOUT_S + MARGIN_S
            current, where = stall_rid, "after the last answer"
            while not aborted:
                resp = await read_response(wire, no_body=False)
                if resp is None:
                    res.closed_by_agent = True
                    return
                res.seen.append(f"extra<-{resp.short()}")
                ids = [v.decode(errors="replace") for v in resp.values(b"x-id")]
                strangers = (set(ids) | foreign_ids(resp.body, stall_rid)) - {stall_rid}
                if strangers or (not ids and resp.status < 400):
                    res.problem(MixedAnswers, f"an answer nobody asked for: {resp.short()}")
                if plan.ending == "close":  # pipelined, all answered: we close now
                    return
        except Unparseable as exc:
            others = foreign_ids(exc.args[0], current)
            res.problem(MixedAnswers if others else ProtocolViolation,
                        f"bytes that are no HTTP answer {where}: "
                        f"{short(exc.args[0])} (other ids in it: {sorted(others)})")
        except TimeoutError:
            if not aborted:
                res.hung = True
                waiting = next((rids[k] for k in range(len(rids)) if k not in res.finals),
                               f"the close after ending {plan.ending!r}")
                if res.closing:
                    waiting = "the close the last exchange announced"
                res.problem(Hang, f"no byte and no close from the agent in {wire.idle_s} s, "
                                  f"waiting for {waiting}")
        finally:
            wire.eof = True
            release_all()

    writing = asyncio.ensure_future(write_all())
    try:
        await read_all()
        await asyncio.wait([writing], timeout=0.1)
    finally:
        writing.cancel()
        writer.close()
    dropped_check(res, aborted)
    return res


def dropped_check(res: ConnResult, aborted: bool) -> None:
    """A valid request nothing excused was left unanswered by a close of the agent's."""
    if res.hung or not res.closed_by_agent:
        return
    plan = res.plan
    for k, (req, rid) in enumerate(zip(plan.reqs, res.rids)):
        if k in res.finals:
            continue
        if aborted or plan.ending == "abort":
            return
        for j in range(k):
            before, answer = plan.reqs[j], res.finals.get(j)
            if before.mode in DISRUPTIVE or before.closes() or answer is None or \
                    not answer.complete or b"close" in answer.tokens(b"connection") or \
                    not answer.values(b"x-id"):
                return
        if req.mode in DISRUPTIVE:
            return
        res.problem(DroppedRequest, f"{rid} ({req!r}) got no answer: the agent closed the "
                                    f"connection")
        return


async def control(port: int, upstream: Upstream, tag_: str) -> list[tuple[type[FuzzFailure], str]]:
    """As many control requests at once as the upstream has idle connections (+1): each
    must get its own answer, which it cannot if the proxy's pool holds stale bytes."""
    with upstream.lock:
        count = min(16, len(upstream.idle) + 1)
        upstream.ctl_expected, upstream.ctl_arrived = count, 0
    problems: list[tuple[type[FuzzFailure], str]] = []

    async def one(i: int) -> None:
        rid = f"{tag_}.ctl{i}"
        req = Req(mode="ctl", method="GET", n=2, connection="close")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            problems.append((AgentCrashed, f"control {rid}: cannot connect: {exc!r}"))
            return
        try:
            writer.write(b"".join(req.encode(rid)))
            resp = await read_response(Wire(reader, HANG_S), no_body=False)
            found = check(req, rid, resp) if resp is not None else []
            if resp is None or not resp.complete or resp.values(b"x-id") != [rid.encode()]:
                found = found or [(AgentCrashed, "no answer of the upstream's")]
            problems.extend((kind, f"control {rid} got {resp.short() if resp else 'nothing'}: "
                                   f"{text}") for kind, text in found)
        except Unparseable as exc:
            problems.append((MixedAnswers, f"control {rid} got {short(exc.args[0])}"))
        except TimeoutError:
            problems.append((Hang, f"control {rid}: no answer in {HANG_S} s"))
        except (ConnectionError, OSError) as exc:
            problems.append((AgentCrashed, f"control {rid}: {exc!r}"))
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return problems


def upstream_check(upstream: Upstream, rids: list[str], seen_violations: int) -> list[str]:
    out = list(upstream.violations[seen_violations:])
    for rid in rids:
        got = upstream.receipts.get(rid, [])
        retry_ok = len(got) == 2 and got[0].index > 0 and not got[0].answered
        if len(got) > 2 or (len(got) == 2 and not retry_ok):
            out.append(f"{rid} reached the upstream {len(got)} times "
                       f"(first on {'a reused' if got[0].index else 'a fresh'} connection, "
                       f"{'answered' if got[0].answered else 'unanswered'})")
    return out


# -- the test --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FuzzAgent, Upstream]]:
    upstream = Upstream()
    agent = FuzzAgent(tmp_path_factory.mktemp("proxy-fuzz"), upstream.port)
    yield agent, upstream
    code = agent.stop()
    upstream.stop()
    tail = agent.log.read_bytes()[-3000:]
    assert code == 0, f"the agent exited {code}: {tail!r}"


_examples = itertools.count()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), print_blob=False,
          phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK_S else []))
@given(plans=st.lists(connections(), min_size=1, max_size=4),
       stagger_ms=st.sampled_from([0, 0, 5, 30]))
def test_fuzz_clients_and_upstream_behaviours(rig: tuple[FuzzAgent, Upstream],
                                              plans: list[ConnPlan], stagger_ms: int) -> None:
    agent, upstream = rig
    if not agent.alive():
        agent.restart()
    example = f"x{next(_examples)}"
    rids = [[f"{example}.{c}.{k}" for k in range(len(p.reqs))] for c, p in enumerate(plans)]
    seen_violations = len(upstream.violations)

    async def run() -> tuple[list[ConnResult | BaseException], list[tuple[type[FuzzFailure], str]]]:
        async def staggered(c: int, plan: ConnPlan) -> ConnResult:
            await asyncio.sleep(c * stagger_ms / 1000)
            return await run_conn(agent.port, c, plan, rids[c])

        results = await asyncio.gather(*(asyncio.wait_for(staggered(c, p), 60)
                                         for c, p in enumerate(plans)), return_exceptions=True)
        return results, await control(agent.port, upstream, example)

    started = time.monotonic()
    results, problems = asyncio.run(run())
    for c, result in enumerate(results):
        if isinstance(result, ConnResult):
            problems += result.problems
        elif isinstance(result, TimeoutError):
            problems.append((Hang, f"conn {c}: not done in 60 s"))
        elif isinstance(result, OSError):
            problems.append((AgentCrashed, f"conn {c}: {result!r}"))
        else:
            raise result
    problems += [(UpstreamAbuse, text) for text in
                 upstream_check(upstream, [r for rs in rids for r in rs], seen_violations)]
    log = agent.new_log()
    if not agent.alive():
        code = agent.proc.returncode if agent.proc else None
        problems.append((AgentCrashed, f"the agent exited {code}: {log[-1500:]!r}"))
    elif b"Traceback (most recent call last)" in log:
        at = log.index(b"Traceback (most recent call last)")
        problems.append((AgentCrashed, f"the agent logged a traceback: "
                                       f"{log[max(0, at - 300):at + 1500]!r}"))
    if ONLY:
        problems = [(k, text) for k, text in problems if k.__name__ in ONLY]
    if not problems:
        return
    agent.restart()  # the next example starts clean
    kind = min((k for k, _ in problems), key=SEVERITY.index)
    transcript = "\n".join(f"  conn {r.index}: {' | '.join(r.seen)}" for r in results
                           if isinstance(r, ConnResult))
    raise kind("\n".join(f"{k.__name__}: {text}" for k, text in problems[:12]) +
               f"\n(example {example}, {time.monotonic() - started:.1f} s)\n{transcript}")
