"""Peers for the proxy conformance suite: a real nginx, a scripted model server, raw clients.

- `Nginx` runs the system's nginx (1 worker, everything in a temporary directory) as a
  reverse proxy configured like the agent's proxy, so it can serve as the oracle.
- `ScriptedUpstream` is a raw-socket HTTP/1.1 server, one thread per connection, whose
  answer to each request is chosen by the request's query (`?case=chunked&id=r1`). It
  records every byte it receives, per connection, and every request it read (head,
  headers as sent, body de-chunked, framing, trailers), so a test can say exactly what
  reached the model, and how many times.
- `Client` / `raw_exchange` speak raw bytes to a proxy; `parse_responses` splits what came
  back into responses (1xx included) with normalised headers and de-chunked bodies.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psutil

from tests.cloud import free_port

CRLF = b"\r\n"
BLOCK = bytes(range(256)) * 4096          # 1 MiB of known bytes for large answers


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` passes
    (returns the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_listening(port: int, timeout: float = 15, proc: subprocess.Popen[bytes] | None = None,
                   ) -> None:
    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    if not wait_for(up, timeout, 0.05):
        raise AssertionError(f"nothing listens on {port} after {timeout} s")


# -- nginx -----------------------------------------------------------------------------------

NGINX_CONF = """\
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format oracle '$status $request_method "$request_uri" up=$upstream_status '
                      'sent=$body_bytes_sent t=$request_time';
    access_log {dir}/access.log oracle;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    keepalive_timeout {keepalive_timeout}s;
    client_header_timeout {client_header_timeout}s;
    client_body_timeout {client_body_timeout}s;
    send_timeout {send_timeout}s;
    upstream model {{
        server 127.0.0.1:{upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_connect_timeout {connect_timeout}s;
            proxy_read_timeout {read_timeout}s;
            proxy_send_timeout {proxy_send_timeout}s;
            proxy_next_upstream {next_upstream};
{extra}
        }}
    }}
}}
"""


class Nginx:
    """nginx in front of 127.0.0.1:`upstream`, on a free port, until `stop()`.

    `next_upstream` defaults to retrying errors on non-idempotent requests too: with one
    server, nginx then retries exactly what the agent retries, a request whose *cached*
    (keep-alive) connection failed before any answer byte (nginx's `peer.cached` rule);
    stock nginx (`error timeout`) would not retry a POST there.
    """

    def __init__(self, upstream: int, *, read_timeout: float = 60, connect_timeout: float = 5,
                 send_timeout: float = 60, client_header_timeout: float = 60,
                 client_body_timeout: float = 60, keepalive_timeout: float = 75,
                 proxy_send_timeout: float = 60, next_upstream: str = "error non_idempotent",
                 extra: str = "") -> None:
        self.port = free_port()
        self.upstream = upstream
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-peer-"))
        conf = NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "", dir=self.dir, port=self.port,
            upstream=upstream, read_timeout=read_timeout, connect_timeout=connect_timeout,
            send_timeout=send_timeout, client_header_timeout=client_header_timeout,
            client_body_timeout=client_body_timeout, keepalive_timeout=keepalive_timeout,
            proxy_send_timeout=proxy_send_timeout, next_upstream=next_upstream, extra=extra)
        (self.dir / "nginx.conf").write_text(conf)
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [binary, "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf"),
             "-e", str(self.dir / "error.log"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(self.port, proc=self.proc)
        except AssertionError:
            log = self.error_log()[-2000:]
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() else ""
            self.stop()
            raise AssertionError(f"nginx did not start: {err} {log}") from None

    @property
    def worker_pids(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.Error:
            return []

    def access_log(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def upstream_connections(pids: Iterable[int], upstream: int) -> list[Any]:
    """The TCP connections the processes `pids` hold to port `upstream` (any state)."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections("tcp")
        except psutil.Error:
            continue
        out += [c for c in conns if c.raddr and c.raddr.port == upstream]
    return out


# -- the scripted upstream --------------------------------------------------------------------

def _headers_of(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        name, _, value = line.partition(b":")
        out.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return out


@dataclass
class UpstreamRequest:
    """One request as the model server read it."""

    conn: int                      # the connection's number, in accept order
    index: int                     # its position on that connection, from 0
    request_line: str
    headers: list[tuple[str, str]]  # as received, names' case kept, in order
    body: bytes                    # de-chunked
    framing: str                   # "length", "chunked" or "none"
    trailers: list[tuple[str, str]]
    head: bytes                    # the raw head, up to and including CRLF CRLF
    reused: bool                   # the connection had carried a request before

    @property
    def method(self) -> str:
        return self.request_line.split(" ")[0]

    @property
    def target(self) -> str:
        parts = self.request_line.split(" ")
        return parts[1] if len(parts) > 1 else ""

    @property
    def version(self) -> str:
        return self.request_line.rsplit(" ", 1)[-1]

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))

    @property
    def id(self) -> str | None:
        return self.params.get("id")

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


@dataclass
class UpstreamConn:
    number: int
    raw: bytearray = field(default_factory=bytearray)
    requests: list[UpstreamRequest] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    busy: bool = False             # between a request's first byte and the end of its answer
    retire: bool = False           # close once the current answer is out
    sock: socket.socket | None = None


class _Closed(Exception):
    """The proxy closed (or reset) the connection."""


class _Reader:
    def __init__(self, sock: socket.socket, conn: UpstreamConn, stop: threading.Event) -> None:
        self.sock, self.conn, self.stop = sock, conn, stop
        self.buf = bytearray()

    def more(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Closed("read timeout")
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if ready:
                break
        else:
            raise _Closed("stopping")
        try:
            data = self.sock.recv(1 << 16)
        except OSError as exc:
            raise _Closed(str(exc)) from None
        if not data:
            raise _Closed("eof")
        self.conn.raw += data
        self.buf += data

    def until(self, marker: bytes, limit: int = 1 << 20) -> bytes:
        while (at := self.buf.find(marker)) < 0:
            if len(self.buf) > limit:
                raise _Closed("head too large")
            self.more()
        out = bytes(self.buf[:at + len(marker)])
        del self.buf[:at + len(marker)]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def chunked(self) -> tuple[bytes, list[tuple[str, str]]]:
        body = bytearray()
        while True:
            size = int(self.until(CRLF).split(b";")[0].strip(), 16)
            if size == 0:
                break
            body += self.exact(size)
            self.exact(2)
        trailer_lines = []
        while (line := self.until(CRLF)[:-2]):
            trailer_lines.append(line)
        return bytes(body), _headers_of(trailer_lines)


class ScriptedUpstream:
    """A model server whose answers are chosen per request by its query string.

    `case` (default `ok`), with `id=` echoed in `X-Id` and in the body:

    ok            200, Content-Length (HEAD: the length, no body); `status=N` answers N
                  (204 and 304 without body); `size=N` bytes of body
    chunked       200 chunked in 3 chunks, trailer `X-Up-Trailer: t1`
    closedelim    200 without length, then close (`size=N`)
    close         200 with Content-Length and `Connection: close`, then close
    http10        `HTTP/1.0 200 OK` with Content-Length, then close
    early103      `103 Early Hints` (Link), then 200
    continue100   `100 Continue` right after the head, then reads the body, then 200
    early413      413 (Connection: close) right after the head, then drains the body, closes
    die           200 with Content-Length 1000 but 10 bytes of body, then close
    crash         reads the whole request, then closes without a byte of answer (with
                  `at=N`: only when it is the connection's request N, from 0; else `ok`)
    silent        reads the request and never answers (until the proxy closes)
    slow          waits `ms` (default 1000) then answers; notes it if the proxy left first
    stale         answers 200 keep-alive, then drops this connection (RST, unread) as soon
                  as the next request's first bytes arrive: the keep-alive race
    hop           200 with hop-by-hop fields and a field named in `Connection:`
    cl_only       reads the body by Content-Length only, as `http.server` does (a chunked
                  body would then be read as the next request: garbage -> 400 + close)
    big           200 with `size` MiB (default 50), holding the server's one "model lock"
    serial        200 once the model lock is free (with `big`: a single-threaded server)
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[UpstreamConn] = []
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    # - inspection

    def requests(self, id: str | None = None) -> list[UpstreamRequest]:
        with self.lock:
            out = [r for c in self.conns for r in c.requests]
        return out if id is None else [r for r in out if r.id == id]

    def wait_requests(self, id: str, count: int = 1, timeout: float = 5) -> list[UpstreamRequest]:
        wait_for(lambda: len(self.requests(id)) >= count, timeout)
        return self.requests(id)

    def raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c.raw) for c in self.conns)

    def conns_with(self, needle: bytes) -> list[UpstreamConn]:
        with self.lock:
            return [c for c in self.conns if needle in c.raw]

    def events(self, id: str | None = None) -> list[str]:
        with self.lock:
            out = [e for c in self.conns for e in c.events]
        return out if id is None else [e for e in out if e.endswith(f" {id}")]

    def drop_idle(self) -> int:
        """Close every connection waiting for its next request (the proxy's pooled ones);
        one still answering is closed once its answer is out."""
        n = 0
        with self.lock:
            for c in self.conns:
                if c.closed.is_set() or c.sock is None:
                    continue
                c.retire = True
                if not c.busy:
                    c.events.append("dropped_idle")
                    with contextlib.suppress(OSError):
                        c.sock.shutdown(socket.SHUT_RDWR)
                    n += 1
        return n

    def open_conns(self) -> int:
        with self.lock:
            return sum(not c.closed.is_set() for c in self.conns)

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)

    # - serving

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                conn = UpstreamConn(len(self.conns), sock=sock)
                self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: UpstreamConn) -> None:
        reader = _Reader(sock, conn, self.stopping)
        stale = False
        try:
            while True:
                with self.lock:
                    conn.busy = False
                    if conn.retire:
                        return
                if stale:
                    while not reader.buf:
                        reader.more(60)
                    conn.events.append("stale_dropped")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    return
                while not reader.buf:
                    reader.more(120)
                with self.lock:
                    conn.busy = True
                keep, stale = self._one(sock, conn, reader)
                if not keep:
                    return
        except _Closed:
            pass
        except OSError as exc:
            conn.events.append(f"error {exc}")
        finally:
            sock.close()
            conn.closed.set()

    def _one(self, sock: socket.socket, conn: UpstreamConn, reader: _Reader) -> tuple[bool, bool]:
        head = reader.until(CRLF + CRLF)
        lines = head[:-4].split(CRLF)
        request_line = lines[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            conn.events.append(f"bad_request {request_line[:40]!r}")
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            return False, False
        headers = _headers_of(lines[1:])
        hmap: dict[str, str] = {}
        for n, v in headers:
            hmap.setdefault(n.lower(), v)
        params = dict(parse_qsl(urlsplit(parts[1]).query, keep_blank_values=True))
        case = params.get("case", "ok")
        rid = params.get("id", "-")
        method = parts[0]
        reused = bool(conn.requests)

        def record(body: bytes, framing: str, trailers: list[tuple[str, str]]) -> None:
            with self.lock:
                conn.requests.append(UpstreamRequest(conn.number, len(conn.requests),
                                                     request_line, headers, body, framing,
                                                     trailers, head, reused))

        def read_body() -> tuple[bytes, str, list[tuple[str, str]]]:
            te = hmap.get("transfer-encoding", "").lower()
            if case != "cl_only" and te.endswith("chunked"):
                body, trailers = reader.chunked()
                return body, "chunked", trailers
            if "content-length" in hmap:
                return reader.exact(int(hmap["content-length"])), "length", []
            return b"", "none", []

        if case == "early413":
            sock.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n"
                         b"Connection: close\r\nX-Id: " + rid.encode() + b"\r\n\r\ntoo large")
            conn.events.append(f"answered_before_body {rid}")
            sock.shutdown(socket.SHUT_WR)
            try:
                body, framing, trailers = read_body()
            except _Closed:
                body, framing, trailers = b"", "unread", []
            record(body, framing, trailers)
            return False, False
        if case == "continue100":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, framing, trailers = read_body()
        record(body, framing, trailers)

        version = parts[2]
        client_conn = {t.strip().lower() for t in hmap.get("connection", "").split(",")}
        keep = "close" not in client_conn and (version == "HTTP/1.1" or "keep-alive" in client_conn)
        tag = b"X-Id: " + rid.encode() + CRLF
        status = int(params.get("status", "200"))
        size = int(params.get("size", "0"))
        payload = (f"id={rid} case={case} method={method} got={len(body)}\n".encode()
                   + b"." * size)

        def plain(extra: bytes = b"", status_line: bytes = b"HTTP/1.1 200 OK") -> bytes:
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            if status != 200:
                status_line = b"HTTP/1.1 %d Status%d" % (status, status)
            length = b"" if status in (204, 304) else b"Content-Length: %d\r\n" % len(payload)
            return (status_line + CRLF + b"Content-Type: text/plain\r\n" + tag + length + extra
                    + CRLF + (b"" if no_body else payload))

        if case == "crash" and int(params.get("at", conn.requests[-1].index)) == len(
                conn.requests) - 1:
            conn.events.append(f"crashed {rid}")
            return False, False
        if case == "silent":
            conn.events.append(f"silent {rid}")
            try:
                while True:
                    reader.more(60)
            except _Closed:
                conn.events.append(f"proxy_left {rid}")
            return False, False
        if case == "slow":
            ready, _, _ = select.select([sock], [], [], int(params.get("ms", "1000")) / 1000)
            if ready and not sock.recv(1, socket.MSG_PEEK):
                conn.events.append(f"proxy_left {rid}")
                return False, False
            sock.sendall(plain())
            conn.events.append(f"answered {rid}")
            return keep, False
        if case == "early103":
            sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            sock.sendall(plain())
            return keep, False
        if case == "chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + tag
                         + b"Transfer-Encoding: chunked\r\n\r\n")
            if method != "HEAD":
                for piece in (payload[:5], payload[5:10], payload[10:]):
                    if piece:
                        sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\nX-Up-Trailer: t1\r\n\r\n")
            return keep, False
        if case == "closedelim":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + tag + CRLF)
            if method != "HEAD":
                sock.sendall(payload)
            return False, False
        if case == "close":
            sock.sendall(plain(b"Connection: close\r\n"))
            return False, False
        if case == "http10":
            sock.sendall(plain(status_line=b"HTTP/1.0 200 OK"))
            return False, False
        if case == "die":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n" + tag + CRLF
                         + b"0123456789")
            conn.events.append(f"died {rid}")
            return False, False
        if case == "hop":
            sock.sendall(plain(b"Connection: X-Up-Named\r\nX-Up-Named: 1\r\n"
                               b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                               b"X-Up-Kept: 1\r\n"))
            return keep, False
        if case == "big":
            if not self.model_lock.acquire(timeout=30):
                conn.events.append(f"lock_timeout {rid}")
                return False, False
            try:
                mib = int(params.get("size", "50"))
                sock.settimeout(30)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % (mib << 20) + tag
                             + CRLF)
                for _ in range(mib):
                    sock.sendall(BLOCK)
                conn.events.append(f"sent_all {rid}")
            except OSError:
                conn.events.append(f"send_failed {rid}")
                return False, False
            finally:
                self.model_lock.release()
            return keep, False
        if case == "serial":
            if not self.model_lock.acquire(timeout=20):
                conn.events.append(f"lock_timeout {rid}")
                return False, False
            self.model_lock.release()
        sock.sendall(plain())
        return keep, case == "stale"


# -- clients ----------------------------------------------------------------------------------

@dataclass
class Response:
    """One response as a client saw it. `headers`: lower-cased names, Date and Server
    dropped, in order; `framing`: "length", "chunked", "close" (until EOF) or "none"."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str
    trailers: list[tuple[str, str]]
    complete: bool
    head: bytes

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return ", ".join(values) if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    @property
    def connection(self) -> set[str]:
        return {t.strip().lower() for v in self.all("connection") for t in v.split(",") if t}

    def significant(self) -> dict[str, Any]:
        """What two proxies must agree on: status, body, whether it is whole, the
        end-to-end headers (framing and connection management left out)."""
        skip = {"connection", "keep-alive", "content-length", "transfer-encoding"}
        return {"status": self.status, "body": self.body, "complete": self.complete,
                "headers": sorted((n, v) for n, v in self.headers if n not in skip)}


def _parse_head(data: bytes) -> tuple[str, int, str, list[tuple[str, str]]] | None:
    lines = data.split(CRLF)
    first = lines[0].decode("latin-1").split(" ", 2)
    if len(first) < 2 or not first[0].startswith("HTTP/") or not first[1].isdigit():
        return None
    headers = [(n.lower(), v) for n, v in _headers_of(lines[1:]) if n.lower() not in
               ("date", "server")]
    return first[0], int(first[1]), first[2] if len(first) > 2 else "", headers


def parse_responses(data: bytes, methods: Iterable[str] = (), eof: bool = True,
                    ) -> tuple[list[Response], bytes]:
    """Split `data` into responses; `methods` are the requests' methods in order (for HEAD),
    `eof`: the connection was closed after `data`. Returns (responses, unparsed rest):
    the last response is `complete=False` when its body was cut short."""
    pending = list(methods)
    out: list[Response] = []
    rest = data
    while rest:
        end = rest.find(CRLF + CRLF)
        if end < 0:
            break
        parsed = _parse_head(rest[:end])
        if parsed is None:
            break
        version, status, reason, headers = parsed
        head, body_data = rest[:end + 4], rest[end + 4:]
        method = "GET" if 100 <= status < 200 else (pending.pop(0) if pending else "GET")
        names = {n for n, _ in headers}
        te = ",".join(v for n, v in headers if n == "transfer-encoding").lower()
        trailers: list[tuple[str, str]] = []
        if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
            body, framing, complete, rest = b"", "none", True, body_data
        elif te.strip().endswith("chunked"):
            body_buf, pos, complete = bytearray(), 0, False
            while True:
                line_end = body_data.find(CRLF, pos)
                if line_end < 0:
                    break
                try:
                    size = int(body_data[pos:line_end].split(b";")[0].strip(), 16)
                except ValueError:
                    break
                if size == 0:
                    tail = body_data.find(CRLF + CRLF, line_end)
                    if body_data[line_end:line_end + 4] == CRLF + CRLF:
                        tail = line_end
                    if tail < 0:
                        break
                    trailer_block = body_data[line_end + 2:tail + 2]
                    trailers = [(n.lower(), v) for n, v in
                                _headers_of([x for x in trailer_block.split(CRLF) if x])]
                    pos, complete = tail + 4, True
                    break
                if len(body_data) < line_end + 2 + size + 2:
                    body_buf += body_data[line_end + 2:line_end + 2 + size]
                    pos = len(body_data)
                    break
                body_buf += body_data[line_end + 2:line_end + 2 + size]
                pos = line_end + 2 + size + 2
            body, framing, rest = bytes(body_buf), "chunked", body_data[pos:]
        elif "content-length" in names:
            length = int(next(v for n, v in headers if n == "content-length"))
            body, framing = body_data[:length], "length"
            complete, rest = len(body) == length, body_data[length:]
        else:
            body, framing, complete, rest = body_data, "close", eof, b""
        out.append(Response(version, status, reason, headers, body, framing, trailers,
                            complete, head))
        if not complete:
            break
    return out, rest


def finals(responses: list[Response]) -> list[Response]:
    return [r for r in responses if r.status >= 200]


class Client:
    """A raw client connection to a proxy."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.data = bytearray()     # everything received
        self.eof = False
        self.methods: list[str] = []
        self.received = 0           # bytes received, kept or not
        self.keep = True            # False: count what arrives, keep nothing (huge answers)

    def send(self, data: bytes) -> None:
        for line in data.split(CRLF):
            word = line.split(b" ", 1)[0]
            if word in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS") and (
                    b" HTTP/" in line or line.count(b" ") == 1):
                self.methods.append(word.decode())
        self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        """Send without looking for request lines (body bytes, dribbles)."""
        self.sock.sendall(data)

    def _recv(self, timeout: float) -> bool:
        """One read; False on timeout."""
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            chunk = self.sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.received += len(chunk)
        if self.keep:
            self.data += chunk
        return True

    def responses(self) -> list[Response]:
        return parse_responses(bytes(self.data), self.methods, self.eof)[0]

    def read_responses(self, count: int, timeout: float | None = None) -> list[Response]:
        """Read until `count` final responses are whole (or EOF, or `timeout`); all the
        responses so far, interim ones included."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.eof:
            done = finals(self.responses())
            if len(done) >= count and all(r.complete for r in done[:count]):
                break
            if not self._recv(deadline - time.monotonic()):
                break
        return self.responses()

    def wait_interim_or_final(self, timeout: float) -> list[Response]:
        deadline = time.monotonic() + timeout
        while not self.eof and not self.responses():
            if not self._recv(deadline - time.monotonic()):
                break
        return self.responses()

    def wait_closed(self, timeout: float) -> float | None:
        """Read (and keep) until the proxy closes; seconds it took, None on timeout."""
        started = time.monotonic()
        deadline = started + timeout
        while not self.eof:
            if not self._recv(deadline - time.monotonic()):
                return None
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


@dataclass
class Exchange:
    data: bytes
    closed: bool                  # the proxy closed the connection
    elapsed: float
    responses: list[Response]


def raw_exchange(port: int, data: bytes | list[bytes], *, pause: float = 0.0,
                 half_close: bool = False, read: bool = True, responses: int | None = None,
                 methods: Iterable[str] | None = None, timeout: float = 5) -> Exchange:
    """Send `data` (a list: pieces with `pause` s between them), optionally half-close,
    and read until the proxy closes, `responses` final responses are whole, or `timeout`."""
    started = time.monotonic()
    client = Client(port, timeout)
    pieces = [data] if isinstance(data, bytes) else data
    try:
        for i, piece in enumerate(pieces):
            if i and pause:
                time.sleep(pause)  # pacing the client, not waiting for a result
            client.send(piece)
        if methods is not None:
            client.methods = list(methods)
        if half_close:
            client.sock.shutdown(socket.SHUT_WR)
        if read:
            if responses is not None:
                client.read_responses(responses, timeout)
            else:
                client.wait_closed(timeout)
    except (ConnectionResetError, BrokenPipeError):
        client.eof = True
    finally:
        client.close()
    return Exchange(bytes(client.data), client.eof, time.monotonic() - started,
                    client.responses())
