"""The request proxy: SageMaker's front door, in front of the model server, timing each request.

HTTP/1.1 is parsed by `httptools` (Node's llhttp): it refuses conflicting
Content-Length / Transfer-Encoding, duplicate Content-Lengths and unknown
transfer codings, which are the request-smuggling vectors; the proxy adds a
64 KiB / 100-header limit (431). Bodies stream both ways in the framing they
came with (Content-Length or chunked), a read at a time, with back-pressure:
a 100 MB upload is never held in memory, and a streamed response's first byte
goes out as soon as it arrives. Upstream connections are pooled (keep-alive); a
pooled connection the server closed meanwhile is retried once on a fresh one
when the whole request was small enough to keep (≤ 1 MiB).

Every request to `/invocations` becomes one `RequestRecord`: status (502 when
the upstream cannot be reached or breaks, 504 when it does not answer in time),
ContainerLatency from the first request byte in to the last response byte out,
ModelLatency from the request's first byte sent upstream to the response's last
byte received. `/ping` and other paths pass through uncounted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

from agent.log import get_logger
from agent.model import RequestRecord

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
READ_SIZE = 256 * 1024
REPLAY_MAX = 1 << 20
CLIENT_IDLE_S = 75.0  # nginx's keepalive_timeout
POOL_IDLE_S = 30.0
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"expect"})
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large",
            501: b"Not Implemented", 502: b"Bad Gateway", 504: b"Gateway Timeout"}

_log = get_logger("proxy")


class _HeaderTooLarge(Exception):
    pass


class _UpstreamFailed(Exception):
    """The upstream broke; `status` is what the client gets (502 or 504)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(slots=True)
class _Head:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    version: str
    chunked: bool
    expect_continue: bool


class _RequestEvents:
    """httptools request callbacks -> a list of events, processed after each read."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.parser: httptools.HttpRequestParser | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._size = 0

    def on_message_begin(self) -> None:
        self._url, self._headers, self._size = b"", [], 0
        self.events.append(("begin", None))

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grow(len(name) + len(value) + 4)
        if len(self._headers) > MAX_HEADERS:
            raise _HeaderTooLarge

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > MAX_HEADER_BYTES:
            raise _HeaderTooLarge

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        lower = [(n.lower(), v) for n, v in self._headers]
        chunked = any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in lower)
        expect = any(n == b"expect" and v.lower() == b"100-continue" for n, v in lower)
        self.events.append(("head", _Head(self.parser.get_method(), self._url, self._headers,
                                          self.parser.should_keep_alive(),
                                          self.parser.get_http_version(), chunked, expect)))

    def on_body(self, body: bytes) -> None:
        self.events.append(("body", bytes(body)))

    def on_message_complete(self) -> None:
        self.events.append(("end", None))


class _ResponseEvents:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser: httptools.HttpResponseParser | None = None
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # llhttp forgets this once feed_data returns after the message: read it now.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()
        self.events.append(("head", None))

    def on_body(self, body: bytes) -> None:
        self.events.append(("body", bytes(body)))

    def on_message_complete(self) -> None:
        self.events.append(("end", None))


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False


@dataclass(slots=True)
class ProxyStats:
    """Counters for self-telemetry."""

    requests: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {"malformed": 0, "headers_too_large": 0,
                                                              "upgrade": 0})
    upstream_errors: int = 0
    connections: int = 0


class RequestProxy:
    """Listens on `listen`, forwards to `upstream`, reports `/invocations` requests.

    Args:
        upstream: (host, port) of the model server.
        on_record: called with each counted request's record (must not block).
        timeout: seconds the upstream may stay silent before a 504.
        metrics_page: when given, `GET /metrics` is answered with its result here.
    """

    def __init__(self, upstream: tuple[str, int], on_record: Callable[[RequestRecord], None], *,
                 timeout: float = 60.0, metrics_page: Callable[[], bytes] | None = None) -> None:
        self._upstream = upstream
        self._on_record = on_record
        self._timeout = timeout
        self._metrics_page = metrics_page
        self._idle: list[_Conn] = []
        self.stats = ProxyStats()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Bind and serve (raises OSError when the address is taken)."""
        self.server = await asyncio.start_server(self._serve, host, port, limit=READ_SIZE,
                                                 backlog=1024)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in self._idle:
            conn.writer.close()
        self._idle.clear()

    # -- one client connection --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        state = _RequestEvents()
        parser = httptools.HttpRequestParser(state)
        state.parser = parser
        request = _Request(self, writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(CLIENT_IDLE_S if request.head is None else
                                               self._timeout):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    break
                if not data:
                    break
                received = time.perf_counter()
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    await request.refuse(501, "upgrade")
                    break
                except (httptools.HttpParserCallbackError, httptools.HttpParserError) as exc:
                    # Our only callback error is _HeaderTooLarge; llhttp's own errors are 400s.
                    too_large = isinstance(exc, httptools.HttpParserCallbackError)
                    await request.refuse(431 if too_large else 400,
                                         "headers_too_large" if too_large else "malformed")
                    break
                events, state.events = state.events, []
                if not await request.handle(events, received):
                    break
        except ConnectionError:
            pass
        finally:
            await request.abandon()
            writer.close()

    # -- upstream connections ---------------------------------------------------------------

    async def acquire(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < POOL_IDLE_S and not conn.reader.at_eof():
                conn.reused = True
                return conn
            conn.writer.close()
        try:
            async with asyncio.timeout(min(5.0, self._timeout)):
                reader, writer = await asyncio.open_connection(*self._upstream, limit=READ_SIZE)
        except (OSError, TimeoutError) as exc:
            raise _UpstreamFailed(502, f"connect: {exc!r}") from None
        return _Conn(reader, writer)

    def release(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)


class _Request:
    """The request in progress on one client connection (one at a time: HTTP/1.1)."""

    def __init__(self, proxy: RequestProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.head: _Head | None = None
        self.began = 0.0
        self.upstream: _Conn | None = None
        self.failed: _UpstreamFailed | None = None
        self.replay: list[bytes] | None = []
        self.sent_at = 0.0
        self.model_done = 0.0
        self.local = False
        self._head_sent = False

    async def handle(self, events: list[tuple[str, object]], received: float) -> bool:
        """Process parsed events; False when the connection must close."""
        for kind, value in events:
            if kind == "begin":
                self.began, self.failed, self.replay, self.local = received, None, [], False
            elif kind == "head":
                assert isinstance(value, _Head)
                await self._start(value)
            elif kind == "body":
                assert isinstance(value, bytes)
                await self._send_body(value)
            elif kind == "end" and not await self._finish():
                return False
        return True

    async def _start(self, head: _Head) -> None:
        self.head = head
        if head.expect_continue:
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if head.method == b"GET" and head.url.split(b"?")[0] == b"/metrics" and \
                self.proxy._metrics_page is not None:
            self.local = True
            return
        lines = [head.method + b" " + head.url + b" HTTP/" + head.version.encode()]
        lines += [n + b": " + v for n, v in head.headers if n.lower() not in HOP_BY_HOP]
        await self._upstream_write(b"\r\n".join(lines) + b"\r\n\r\n")

    async def _send_body(self, body: bytes) -> None:
        if self.local or self.head is None:
            return
        if self.head.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        await self._upstream_write(body)

    async def _upstream_write(self, data: bytes) -> None:
        if self.failed is not None:
            return
        if self.replay is not None:
            self.replay.append(data)
            if sum(map(len, self.replay)) > REPLAY_MAX:
                self.replay = None
        try:
            if self.upstream is None:
                self.upstream = await self.proxy.acquire()
                self.sent_at = time.perf_counter()
            self.upstream.writer.write(data)
            await self.upstream.writer.drain()
        except _UpstreamFailed as exc:
            self.failed = exc
        except (ConnectionError, OSError) as exc:
            self.failed = _UpstreamFailed(502, f"send: {exc!r}")

    async def _finish(self) -> bool:
        head = self.head
        assert head is not None
        if self.local:
            assert self.proxy._metrics_page is not None
            page = self.proxy._metrics_page()
            self.client.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                              b"Content-Length: %d\r\n\r\n%b" % (len(page), page))
            await self.client.drain()
            self.head = None
            return head.keep_alive
        if head.chunked and self.failed is None:
            await self._upstream_write(b"0\r\n\r\n")
        status, keep = await self._respond(head)
        counted = head.url.split(b"?")[0].startswith(b"/invocations")
        if counted:
            done = time.perf_counter()
            model = (self.model_done - self.sent_at) if self.model_done else done - self.began
            self.proxy.stats.requests += 1
            self.proxy._on_record(RequestRecord(status, (done - self.began) * 1e6,
                                                min(model, done - self.began) * 1e6))
        self.head = None
        return keep and head.keep_alive

    async def _respond(self, head: _Head) -> tuple[int, bool]:
        """Relay the upstream's answer (or an error of ours); (status, client may stay)."""
        self.model_done, self._head_sent = 0.0, False
        if self.failed is None:
            try:
                return await self._relay(head)
            except _UpstreamFailed as exc:
                self.failed = exc
        self.proxy.stats.upstream_errors += 1
        status = self.failed.status if self.failed else 502
        if self.upstream is not None:
            self.upstream.writer.close()
            self.upstream = None
        if self._head_sent:
            return status, False  # the answer broke mid-way: all we can do is close
        body = b"upstream " + (b"timed out" if status == 504 else b"unavailable") + b"\n"
        self.client.write(b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                          b"Connection: close\r\n\r\n%b" % (status, _REASONS[status], len(body), body))
        await self.client.drain()
        if self.proxy.stats.upstream_errors in (1, 10, 100, 1000, 10000):
            _log.warning("upstream_failed", status=status, reason=str(self.failed),
                         failures=self.proxy.stats.upstream_errors)
        return status, False

    async def _relay(self, head: _Head) -> tuple[int, bool]:
        conn = self.upstream
        assert conn is not None
        try:
            return await self._relay_from(conn, head)
        except _UpstreamFailed:
            if conn.reused and not self._head_sent and self.replay is not None:
                conn.writer.close()  # a pooled connection the server had closed: once more
                self.upstream = None
                for piece in self.replay:
                    await self._upstream_write(piece)
                if self.failed is None and self.upstream is not None:
                    self.upstream.reused = False
                    return await self._relay_from(self.upstream, head)
            raise

    async def _relay_from(self, conn: _Conn, head: _Head) -> tuple[int, bool]:
        state = _ResponseEvents()
        parser = httptools.HttpResponseParser(state)
        state.parser = parser
        chunked = until_close = False
        while True:
            try:
                async with asyncio.timeout(self.proxy._timeout):
                    data = await conn.reader.read(READ_SIZE)
            except TimeoutError:
                raise _UpstreamFailed(504, "no answer in time") from None
            except (ConnectionError, OSError) as exc:
                raise _UpstreamFailed(502, f"read: {exc!r}") from None
            if not data:
                if self._head_sent and until_close:
                    self.model_done = time.perf_counter()
                    self.upstream = None
                    conn.writer.close()
                    return parser.get_status_code(), False
                raise _UpstreamFailed(502, "upstream closed the connection")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise _UpstreamFailed(502, f"bad answer: {exc}") from None
            complete = False
            for kind, value in state.events:
                if kind == "head":
                    chunked, until_close = self._write_head(parser, state.headers, head)
                    if head.method == b"HEAD":
                        complete = True
                elif kind == "body":
                    assert isinstance(value, bytes)
                    self.client.write(b"%x\r\n%b\r\n" % (len(value), value) if chunked else value)
                elif kind == "end":
                    if chunked:
                        self.client.write(b"0\r\n\r\n")
                    complete = True
            state.events = []
            await self.client.drain()
            if complete:
                self.model_done = time.perf_counter()
                self.upstream = None
                if state.keep_alive and head.method != b"HEAD":
                    self.proxy.release(conn)
                else:
                    conn.writer.close()
                return parser.get_status_code(), not until_close

    def _write_head(self, parser: httptools.HttpResponseParser,
                    headers: list[tuple[bytes, bytes]], head: _Head) -> tuple[bool, bool]:
        status = parser.get_status_code()
        lower = {n.lower() for n, _ in headers}
        chunked = any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower()
                      for n, v in headers)
        framed = chunked or b"content-length" in lower or status in (204, 304) or status < 200
        lines = [b"HTTP/1.1 %d %b" % (status, _reason(status))]
        lines += [n + b": " + v for n, v in headers if n.lower() not in HOP_BY_HOP]
        if not framed or not head.keep_alive:
            lines.append(b"Connection: close")
        self.client.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self._head_sent = True
        return chunked, not framed and head.method != b"HEAD"

    async def refuse(self, status: int, reason: str) -> None:
        """Answer a request we will not forward, and count why."""
        self.proxy.stats.refused[reason] += 1
        body = _REASONS[status] + b"\n"
        try:
            self.client.write(b"HTTP/1.1 %d %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                              % (status, _REASONS[status], len(body), body))
            await self.client.drain()
        except ConnectionError:
            pass

    async def abandon(self) -> None:
        """The connection ends (the client left, or refused): drop any upstream connection.
        A request the client abandoned is not counted: no answer was given to anyone."""
        if self.upstream is not None:
            self.upstream.writer.close()
            self.upstream = None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
