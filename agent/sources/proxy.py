"""The request proxy: SageMaker's front door, in front of the model server, timing each request.

Built like uvicorn's httptools protocol and nginx's upstream module: asyncio
`Protocol` callbacks, `httptools` (llhttp) parsing both directions, transport
flow control, no coroutine or timeout context per read. One `_Client` per client
connection and one `_Upstream` per model-server connection; an `_Exchange` is one
request and its answer, and is the only thing that ever joins the two, so an
answer is only ever written to the connection of the request that produced it.

- **Requests** are checked (`agent.rules.http`) and reach the model as HTTP/1.1
  keep-alive whatever the client spoke. Content-Length bodies stream through with
  back-pressure; chunked bodies are de-chunked and sent with Content-Length (held
  in memory up to 1 MiB, then in an unlinked temporary file, as nginx's request
  buffering does). Trailers never join a head.
- **Answers** stream in their own framing: chunked stays chunked (trailers stay
  trailers) for HTTP/1.1 clients; HTTP/1.0 clients get no chunks (close-delimited
  instead); a close-delimited answer is chunked for HTTP/1.1 clients so their
  connection survives. `100` is absorbed, other `1xx` relayed, and neither ends
  a request. An answer that comes before the whole body was sent is relayed at
  once and its upstream connection closed.
- **Pooling**: an upstream connection goes back to the pool only after a whole
  final answer that allows keep-alive, with no stray byte after it. A request is
  retried once, on a fresh connection, only when a *reused* connection failed
  before any byte of answer (the keep-alive race), replaying the exact bytes sent
  (kept up to 1 MiB); never after a timeout, never after answer bytes.
- **Timeouts** as nginx's (each a setting): client header, client body between
  reads, send between writes to a client that does not read, keep-alive idle,
  upstream connect, upstream read between reads. One sweep timer per proxy checks
  each connection's deadline, so a read costs one clock read, not a timer.
- **Counting**: every request to `/invocations` (or `/models/{name}/invoke`)
  becomes exactly one `RequestRecord`: the upstream's status, 502 when it could
  not be reached or broke, 504 when it stayed silent, 499 when the client left
  before any answer (nginx's "client closed request"). ContainerLatency runs from
  the first request byte in to the last answer byte out, ModelLatency from the
  first byte sent upstream to the last answer byte received.
- **Multi-model endpoints** (SageMaker's mms-container-apis contract): `POST
  /models/{name}/invoke` is counted with its TargetModel (the
  `X-Amzn-SageMaker-Target-Model` header, else `{name}`); `POST /models` (load, the
  model named by its JSON body's `model_name`, of which at most 64 KiB is kept) and
  `DELETE /models/{name}` (unload) are reported with their kind, not as invocations.
  `X-Amzn-SageMaker-Inference-Component` names the inference component.
- **Concurrency**: invocations in flight, from the request head parsed to the last
  answer byte out (a streamed answer until its end). An integer per change; a 1 s
  timer, aligned to the wall-clock second, reports each second's lowest, highest and
  time-weighted mean count (`on_concurrency`), so a burst shorter than a second still
  sets the Maximum.
- **Streams**: for a chunked or close-delimited `text/event-stream` answer, the time
  from the request sent upstream to the first read carrying body bytes, and the time
  between two such reads (one "chunk" is one read of the model's socket: chunks that
  arrive together count once; at most `MAX_GAPS` per answer, the rest counted in
  `stream_gaps_dropped`).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO

import httptools

from agent.log import first_or_every, get_logger
from agent.model import INVOKE, LOAD, RequestRecord
from agent.rules import http as rules

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
REPLAY_MAX = 1 << 20          # bytes of a request kept to replay it once
BODY_MEMORY = 1 << 20         # a chunked request body held in memory before spilling to disk
BODY_MAX = 1 << 30            # a chunked request body larger than this is refused (413)
BACKLOG_MAX = 256 * 1024      # bytes held for the upstream (pipelined, connecting) before pausing
POOL_MAX = 64                 # idle upstream connections kept
POOL_IDLE_S = 30.0            # an idle upstream connection older than this is closed
LINGER_S = 5.0                # nginx's lingering_timeout: read and drop a client's leftovers
WRITE_HIGH = 256 * 1024       # transport write buffer bounds (flow control)
WRITE_LOW = 64 * 1024
MAX_GAPS = 10_000             # inter-chunk times kept per streamed answer
MODEL_NAMES_MAX = 4096        # decoded model names cached

_log = get_logger("proxy")
_now = time.perf_counter


@dataclass(frozen=True, slots=True)
class ProxyTimeouts:
    """Seconds, with nginx's defaults (`read` is TELEMETRY_PROXY_TIMEOUT)."""

    client_header: float = 60.0   # client_header_timeout: the whole head
    client_body: float = 60.0     # client_body_timeout: between two reads of the body
    send: float = 60.0            # send_timeout: a client that does not read its answer
    keepalive: float = 75.0       # keepalive_timeout: an idle client connection
    connect: float = 5.0          # proxy_connect_timeout
    read: float = 60.0            # proxy_read_timeout: between two reads of the answer


@dataclass(slots=True)
class ProxyStats:
    """Counters for self-telemetry."""

    requests: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {
        "malformed": 0, "headers_too_large": 0, "host": 0, "transfer_coding": 0,
        "body_too_large": 0})
    upstream_errors: int = 0
    upstream_timeouts: int = 0
    client_aborts: int = 0
    client_timeouts: int = 0
    retries: int = 0
    connections: int = 0
    upstream_connections: int = 0
    stream_gaps_dropped: int = 0


class _HeaderTooLarge(Exception):
    pass


class RequestProxy:
    """Listens on `listen`, forwards to `upstream`, reports `/invocations` requests.

    Args:
        listen: (host, port) to serve on.
        upstream: (host, port) of the model server.
        on_record: called with each counted request's record (must not block).
        timeouts: nginx-like timeouts; `timeout=` alone sets the upstream read one.
        metrics_page: when given, `GET /metrics` is answered with its result here (bytes,
            or an awaitable of them: the page merged with the model server's).
        on_concurrency: called once a second with the lowest, highest and time-weighted
            mean invocations in flight during that second, its midpoint (Unix s) and its
            length (s; shorter for the first and the last, at a stop).
    """

    name = "proxy"

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int],
                 on_record: Callable[[RequestRecord], None], *,
                 timeouts: ProxyTimeouts | None = None, timeout: float | None = None,
                 metrics_page: Callable[[], bytes | Awaitable[bytes]] | None = None,
                 on_concurrency: Callable[[int, int, float, float, float], None] | None = None
                 ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.on_record = on_record
        self.timeouts = timeouts or ProxyTimeouts()
        if timeout is not None:
            self.timeouts = ProxyTimeouts(**{**_fields(self.timeouts), "read": timeout})
        self.metrics_page = metrics_page
        self.stats = ProxyStats()
        self.server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle: list[_Upstream] = []
        self.clients: set[_Client] = set()
        self.upstreams: set[_Upstream] = set()
        self.closing = False
        # While a read is handled, writes gather per connection and go out as one write
        # at its end: one syscall per direction per read, not one per head and body.
        self.corked = False
        self.dirty: list[_Client | _Upstream] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = max(0.05, min(1.0, min(_fields(self.timeouts).values()) / 4))
        # Invocations in flight: changed on the request path (a few integer operations),
        # read by the once-a-second sampler.
        self.on_concurrency = on_concurrency
        self.in_flight = 0
        self._low = self._high = 0
        self._area = 0.0          # in-flight × seconds since the last sample
        self._changed = self._sampled = _now()
        self._sampler: asyncio.TimerHandle | None = None
        self.model_names: dict[bytes, str] = {}

    def enter(self, now: float) -> None:
        """An invocation begins (its first byte came at `now`; its head is parsed)."""
        if now > self._changed:  # a pipelined request's first byte may predate the last change
            self._area += self.in_flight * (now - self._changed)
            self._changed = now
        self.in_flight += 1
        if self.in_flight > self._high:
            self._high = self.in_flight

    def leave(self, now: float) -> None:
        """An invocation ended (its last answer byte went out, or it was dropped)."""
        self._area += self.in_flight * (now - self._changed)
        self._changed = now
        self.in_flight -= 1
        if self.in_flight < self._low:
            self._low = self.in_flight

    def _sample(self) -> None:
        """Report the second that just ended, then wait for the next wall-clock second."""
        assert self.loop is not None
        self._report()
        self._sampler = self.loop.call_later(1.0 - time.time() % 1.0, self._sample)

    def _report(self) -> None:
        """Tell `on_concurrency` the lowest, highest and mean in flight since the last report."""
        now = _now()
        span = now - self._sampled
        area = self._area + self.in_flight * (now - self._changed)
        mean = area / span if span > 0 else float(self.in_flight)
        low, high = self._low, self._high
        self._area, self._changed, self._sampled = 0.0, now, now
        self._low = self._high = self.in_flight
        if self.on_concurrency is not None and span > 0:
            self.on_concurrency(low, high, mean, time.time() - span / 2, span)

    def model_name(self, raw: bytes) -> str:
        """`raw` (a header, or a decoded path segment) as a dimension value, cached."""
        name = self.model_names.get(raw)
        if name is None:
            name = rules.model_name(raw)
            if len(self.model_names) < MODEL_NAMES_MAX:
                self.model_names[raw] = name
        return name

    async def start(self) -> None:
        """Bind and serve (raises OSError when the address is taken)."""
        self.loop = asyncio.get_running_loop()
        host, port = self.listen
        self.server = await self.loop.create_server(lambda: _Client(self), host, port,
                                                    backlog=1024)
        self._sweeper = self.loop.call_later(self._tick, self._sweep)
        self._changed = self._sampled = _now()
        self._sampler = self.loop.call_later(1.0 - time.time() % 1.0, self._sample)

    async def stop(self, deadline: float) -> None:
        """`close`, with the answers in progress given until `deadline` (monotonic), at most 5 s."""
        await self.close(min(5.0, max(0.0, deadline - time.monotonic())))

    def counters(self) -> dict[str, int]:
        """`stats`, flat: `refused` by reason as `refused_<reason>`."""
        stats = self.stats
        return {"connections": stats.connections, "requests": stats.requests,
                "upstream_errors": stats.upstream_errors,
                "upstream_timeouts": stats.upstream_timeouts,
                "upstream_connections": stats.upstream_connections,
                "client_aborts": stats.client_aborts, "client_timeouts": stats.client_timeouts,
                "retries": stats.retries, "stream_gaps_dropped": stats.stream_gaps_dropped,
                **{f"refused_{k}": v for k, v in stats.refused.items()}}

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let answers in progress finish for up to `grace` s, close the rest."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()
        for client in list(self.clients):
            if client.current is None:
                client.transport.close()
        deadline = time.monotonic() + grace
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.transport.abort()
        for conn in list(self.upstreams):
            conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
            self._report()  # the last part of a second: a burst just before a stop counts

    def uncork(self) -> None:
        self.corked = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()

    def _sweep(self) -> None:
        """Expire the connections whose deadline passed (one timer for all of them)."""
        assert self.loop is not None
        now = self.loop.time()
        for client in [c for c in self.clients if 0 < c.deadline <= now]:
            client.expired()
        for conn in [u for u in self.upstreams if 0 < u.deadline <= now]:
            conn.expired()
        self._sweeper = self.loop.call_later(self._tick, self._sweep)

    # -- upstream connections ---------------------------------------------------------------

    def acquire(self, exchange: _Exchange, *, fresh: bool = False) -> None:
        """Give `exchange` an upstream connection: a pooled one, or a new one (connecting)."""
        assert self.loop is not None
        now = self.loop.time()
        while self.idle and not fresh:
            conn = self.idle.pop()
            if now - conn.idle_since < POOL_IDLE_S and not conn.transport.is_closing():
                conn.attach(exchange, reused=True)
                return
            conn.transport.close()
        conn = _Upstream(self)
        conn.attach(exchange, reused=False)
        conn.deadline = now + self.timeouts.connect
        conn.connecting = self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: _Upstream) -> None:
        assert self.loop is not None
        try:
            await self.loop.create_connection(lambda: conn, *self.upstream)
        except OSError as exc:
            conn.failed(502, f"connect: {exc!r}")
        except asyncio.CancelledError:
            conn.failed(504, "connect timed out")

    def release(self, conn: _Upstream) -> None:
        assert self.loop is not None
        if self.closing or len(self.idle) >= POOL_MAX:
            conn.transport.close()
            return
        conn.idle_since = self.loop.time()
        conn.deadline = 0.0
        conn.transport.resume_reading()  # paused for a slow client, maybe: watch for EOF
        self.idle.append(conn)


def _fields(timeouts: ProxyTimeouts) -> dict[str, float]:
    return {name: getattr(timeouts, name) for name in ProxyTimeouts.__slots__}


class _Exchange:
    """One request and its answer: the only link between a client and an upstream."""

    __slots__ = ("client", "req", "counted", "began", "upstream", "pending", "pending_bytes",
                 "replay", "replay_bytes", "retried", "request_done", "request_sent", "body",
                 "body_bytes", "sent_at", "model_done", "status", "answered", "head_sent",
                 "finished", "out_chunked", "keep_client", "local", "is_head",
                 "version_1_1", "expect_continue", "truncated", "kind", "model", "load_body",
                 "stream")

    def __init__(self, client: _Client, req: rules.RequestHead, began: float, *,
                 is_head: bool, local: bool, method: bytes = b"POST") -> None:
        self.client = client
        self.req = req
        # TargetModel of an invocation; the (opaque) model_name of an unload; a load's
        # comes from its body at the end
        self.load_body: bytearray | None = None
        if req.path.startswith(b"/invocations"):  # the common case, without classify()
            self.kind, self.counted, self.model = INVOKE, True, req.target_model
            client.proxy.enter(began)
        else:
            kind, name = rules.classify(method, req.path)
            self.kind = kind
            self.counted = kind != rules.OTHER and not local
            name = rules.path_segment(name)
            self.model = (req.target_model or name) if kind == INVOKE else name
            if kind == LOAD:
                self.load_body = bytearray()
            elif kind == INVOKE:
                client.proxy.enter(began)
        self.stream: _Stream | None = None  # timings of a streamed answer
        self.began = began
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []      # for the upstream while it connects or waits its turn
        self.pending_bytes = 0
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self.retried = False
        self.request_done = False           # the client sent the whole request
        self.request_sent = False           # ... and all of it went upstream
        self.body: _Body | None = _Body() if req.chunked else None
        self.body_bytes = 0
        self.sent_at = 0.0
        self.model_done = 0.0
        self.status = 0                     # the final answer's status, once its head came
        self.answered = False               # any byte of answer came from the upstream
        self.head_sent = False              # the final head went to the client
        self.finished = False
        self.out_chunked = False
        self.keep_client = client.keep_alive
        self.local = local
        self.is_head = is_head
        self.version_1_1 = client.version_1_1  # this request's, not a pipelined later one's
        self.expect_continue = req.expect_continue
        self.truncated = False              # part of the body was never sent upstream

    # -- request side ---------------------------------------------------------------------

    def start(self) -> None:
        """This exchange's turn on its client connection: go upstream (or answer locally)."""
        client = self.client
        if self.expect_continue and not self.request_done:
            client.write(rules.CONTINUE)
        if self.local:
            if self.request_done:
                self._answer_locally()
            return
        if self.req.chunked:
            if self.request_done:
                self._send_buffered_body()
            return
        self._to_upstream(self.req.head)
        for piece in self.pending:
            self._to_upstream(piece)
        self.pending, self.pending_bytes = [], 0
        if self.request_done:
            self.request_sent = True

    def on_body(self, data: bytes, started: bool) -> None:
        if self.local:
            return
        load = self.load_body
        if load is not None and len(load) < rules.LOAD_BODY_MAX:
            load += data[:rules.LOAD_BODY_MAX - len(load)]
        if self.body is not None:
            self.body_bytes += len(data)
            if self.body_bytes > BODY_MAX:
                raise rules.Refused(413, "body_too_large")
            self.body.add(data)
        elif not started:
            self.pending.append(data)
            self.pending_bytes += len(data)
            self.client.backlog += len(data)
        elif self.status:
            self.truncated = True  # answered early: the rest of the body goes nowhere
        else:
            conn = self.upstream
            replay = self.replay
            if conn is None or replay is None:
                self._to_upstream(data)
                return
            self.replay_bytes += len(data)
            if self.replay_bytes > REPLAY_MAX:
                self.replay = None
            else:
                replay.append(data)
            conn.send(data)

    def on_request_done(self, started: bool) -> None:
        self.request_done = True
        if not started:
            return
        if self.local:
            self._answer_locally()
        elif self.req.chunked:
            self._send_buffered_body()
        else:
            self.request_sent = not self.truncated

    def _send_buffered_body(self) -> None:
        assert self.body is not None
        self._to_upstream(self.req.head + rules.chunked_head_end(self.body.size))
        self.body.send(self)

    def _to_upstream(self, data: bytes) -> None:
        """Write to the upstream, connecting first when there is none yet."""
        if self.replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes > REPLAY_MAX:
                self.replay = None
            else:
                self.replay.append(data)
        conn = self.upstream
        if conn is None:
            self.sent_at = _now()
            self.client.proxy.acquire(self)
            conn = self.upstream
            assert conn is not None
        conn.send(data)

    # -- answer side ----------------------------------------------------------------------

    def on_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if status != 100 and self.version_1_1 and not self.client.gone:
            self.client.write(rules.interim_head(status, reason, headers))

    def on_answer_head(self, status: int, reason: bytes,
                       headers: list[tuple[bytes, bytes]]) -> int:
        """The final answer's head: relay it; how the upstream frames the body."""
        self.status = status
        client = self.client
        answer = rules.answer_head(
            status, reason, headers, is_head=self.is_head, client_1_1=self.version_1_1,
            # an early answer leaves the rest of the body unread: the connection closes
            keep=self.keep_client and self.request_done and not client.proxy.closing)
        self.keep_client = answer.keep
        self.out_chunked = answer.chunked
        if answer.framing >= rules.CHUNKED_BODY and self.kind == INVOKE and rules.is_streamed(
                answer.framing, headers):
            self.stream = _Stream()
        self.head_sent = True
        client.write(answer.head)
        return answer.framing

    def on_answer_done(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.model_done = _now()
        if self.out_chunked:
            self.client.write(rules.trailer_section(trailers))
        self.upstream = None
        self.client.exchange_done(self)

    def on_upstream_failed(self, status: int, reason: str) -> bool:
        """The upstream broke or stayed silent. True when the request is being retried."""
        conn = self.upstream
        self.upstream = None
        proxy = self.client.proxy
        if (status == 502 and conn is not None and conn.reused and not self.answered
                and not self.retried and self.replay is not None and not self.client.gone):
            self.retried = True
            proxy.stats.retries += 1
            replay, self.replay = self.replay, None
            proxy.acquire(self, fresh=True)
            assert self.upstream is not None
            for piece in replay:
                self.upstream.send(piece)
            return True
        proxy.stats.upstream_errors += 1
        if status == 504:
            proxy.stats.upstream_timeouts += 1
        if first_or_every(proxy.stats.upstream_errors, 1000):
            _log.warning("upstream_failed", status=status, reason=reason,
                         failures=proxy.stats.upstream_errors)
        self.model_done = _now()
        self.status = status
        client = self.client
        if self.head_sent:
            client.keep_alive = False
            client.finish(self, abort=True)  # the answer broke mid-way: all we can do is close
        else:
            # nginx keeps the client's connection after its own 502/504 when it can
            self.keep_client = keep = (self.keep_client and self.request_done
                                       and not proxy.closing)
            client.write(rules.error_answer(status, close=not keep, is_head=self.is_head,
                                            keep_alive_1_0=not self.version_1_1))
            client.exchange_done(self)
        return False

    def _answer_locally(self) -> None:
        page_fn = self.client.proxy.metrics_page
        assert page_fn is not None
        page = page_fn()
        if not isinstance(page, bytes):  # merged with the model's page: wait for it
            asyncio.ensure_future(page).add_done_callback(self._page_made)
            return
        self._send_page(page)

    def _page_made(self, made: asyncio.Future[bytes]) -> None:
        """The merged page is ready; the client may have left or timed out meanwhile."""
        if self.finished or self.client.current is not self:
            return
        if made.cancelled() or made.exception() is not None:
            self.on_upstream_failed(502, "metrics page failed")
            return
        self._send_page(made.result())

    def _send_page(self, page: bytes) -> None:
        self.status = 200
        self.head_sent = True
        self.client.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                          b"Content-Length: %d\r\n%b\r\n%b"
                          % (len(page), b"" if self.keep_client else b"Connection: close\r\n",
                             page))
        self.client.exchange_done(self)

    def abandon(self, status: int) -> None:
        """The client side ended this request: drop its model connection (unread answers are
        not pooled) and report it, with the model's status if its answer had begun."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.detach_and_close()
        self.record(self.status or status)

    def discard(self) -> None:
        """A queued request dropped before its turn (its connection closed): not reported,
        but no longer in flight."""
        if self.finished:
            return
        self.finished = True
        if self.body is not None:
            self.body.close()
        if self.kind == INVOKE and self.counted:
            self.client.proxy.leave(_now())

    def record(self, status: int) -> None:
        """Report this request once (counted paths only)."""
        if self.finished:
            return
        self.finished = True
        if self.body is not None:
            self.body.close()
        if not self.counted:
            return
        done = _now()
        container = done - self.began
        model = (self.model_done or done) - (self.sent_at or self.began)
        proxy = self.client.proxy
        proxy.stats.requests += 1
        if self.kind != INVOKE:
            proxy.on_record(self._model_call(status, container, model))
            return
        proxy.leave(done)
        if self.stream is None and not self.model and self.req.component is None:
            proxy.on_record(RequestRecord(status, container * 1e6,
                                          min(model, container) * 1e6))
            return
        stream, component = self.stream, self.req.component
        first = (stream.first_at - self.sent_at) * 1e6 if (
            stream is not None and stream.first_at and self.sent_at) else None
        proxy.on_record(RequestRecord(
            status, container * 1e6, min(model, container) * 1e6, INVOKE,
            proxy.model_name(self.model) if self.model else None,
            proxy.model_name(component) if component else None,
            first, stream.gaps if first is not None and stream is not None else None))

    def _model_call(self, status: int, container: float, model: float) -> RequestRecord:
        """A multi-model load or unload, named by the load's JSON body or the unload's path
        (None when the body named no model)."""
        proxy = self.client.proxy
        name: str | None = None
        if self.kind == LOAD:
            name = rules.loaded_model_name(bytes(self.load_body or b""))
        elif self.model:
            name = proxy.model_name(self.model)
        return RequestRecord(status, container * 1e6, min(model, container) * 1e6, self.kind,
                             name)


class _Stream:
    """A streamed answer's timings: its first body read and the gaps between reads (µs)."""

    __slots__ = ("first_at", "last_at", "gaps")

    def __init__(self) -> None:
        self.first_at = self.last_at = 0.0
        self.gaps: list[float] = []

    def read_at(self, at: float, proxy: RequestProxy) -> None:
        """Body bytes came in the read made at `at` (perf_counter s)."""
        if not self.first_at:
            self.first_at = self.last_at = at
        elif at != self.last_at:
            if len(self.gaps) < MAX_GAPS:
                self.gaps.append((at - self.last_at) * 1e6)
            else:
                proxy.stats.stream_gaps_dropped += 1
            self.last_at = at


class _Body:
    """A chunked request body, whole before it goes upstream: memory, then a private file."""

    __slots__ = ("parts", "size", "file", "sent")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.file: IO[bytes] | None = None
        self.sent = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.file is None and self.size <= BODY_MEMORY:
            self.parts.append(data)
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
            self.file.write(b"".join(self.parts))
            self.parts = []
        self.file.write(data)

    def send(self, exchange: _Exchange) -> None:
        """Write what is left to the upstream, pausing while its buffer is full."""
        if self.file is None:
            body = b"".join(self.parts)
            self.parts = []
            if body:
                exchange._to_upstream(body)
            exchange.request_sent = True
            return
        conn = exchange.upstream
        self.file.seek(self.sent)
        while self.sent < self.size:
            if conn is not None and conn.write_paused:
                conn.on_drain = lambda: self.send(exchange)
                return
            piece = self.file.read(256 * 1024)
            self.sent += len(piece)
            exchange._to_upstream(piece)
            conn = exchange.upstream
        exchange.request_sent = True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _Client(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges in order."""

    def __init__(self, proxy: RequestProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Exchange | None = None      # the exchange whose answer is being sent
        self.queue: deque[_Exchange] = deque()     # pipelined requests waiting their turn
        self.incoming: _Exchange | None = None     # the request whose body is being parsed
        self.keep_alive = True
        self.version_1_1 = True
        self.gone = False
        self.out: list[bytes] = []
        self.backlog = 0                          # bytes held for queued requests
        self.deadline = 0.0
        self.write_paused = False
        self.read_paused = False
        self.upstream_full = False
        self.discarding = False                   # input is read and dropped from now on
        self.lingering = False
        self.refusal = 0                          # an error answer owed after the current one
        self.in_head = False
        self.upgrading = False
        self.synthetic = False                    # parsing a body after an ignored Upgrade
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._began = 0.0

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        proxy = self.proxy
        proxy.stats.connections += 1
        proxy.clients.add(self)
        assert proxy.loop is not None
        self.deadline = proxy.loop.time() + proxy.timeouts.client_header

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            self._update_deadline()
            return
        if not self.in_head and self.incoming is None and _http_0_9(data):
            self._refuse(400, "malformed")  # nginx would serve it; see _http_0_9
            return
        proxy = self.proxy
        proxy.corked = True
        try:
            self._feed(data)
            self._update_deadline()
        finally:
            proxy.uncork()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, rules.Refused):
                self._refuse(cause.status, cause.reason)
            elif isinstance(cause, _HeaderTooLarge):
                self._refuse(431, "headers_too_large")
            else:
                raise
        except httptools.HttpParserError:
            if not self.discarding:  # llhttp's complaint about bytes after a closing request
                self._refuse(400, "malformed")
        else:
            self._update_reading()

    def eof_received(self) -> bool | None:
        # nginx takes a half-closed client as gone (499): the model's work would go on
        # for nobody. The transport closes; connection_lost counts the request.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.proxy.clients.discard(self)
        exchange = self.current
        self.current = None
        if exchange is not None and not exchange.finished:
            self.proxy.stats.client_aborts += 1
            exchange.abandon(499)
        self._drop_queue()

    def pause_writing(self) -> None:
        self.write_paused = True
        assert self.proxy.loop is not None
        self.deadline = self.proxy.loop.time() + self.proxy.timeouts.send
        exchange = self.current
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.current
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.resume()
        self._update_deadline()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.synthetic:
            return
        self._url, self._headers, self._header_bytes = b"", [], 0
        self._began = _now()
        self.in_head = True
        if self.current is None:
            assert self.proxy.loop is not None
            self.deadline = self.proxy.loop.time() + self.proxy.timeouts.client_header

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _HeaderTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.incoming is not None:
            return  # a trailer field: dropped, never merged into a head
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) > MAX_HEADERS:
            raise _HeaderTooLarge

    def on_headers_complete(self) -> None:
        if self.synthetic:
            self.synthetic = False
            return
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method()
        req = rules.check_request(method, self._url, version, self._headers)
        self.version_1_1 = version == "1.1"
        self.keep_alive = self.keep_alive and parser.should_keep_alive()
        self.upgrading = parser.should_upgrade()
        local = (method == b"GET" and req.path == b"/metrics"
                 and self.proxy.metrics_page is not None)
        exchange = _Exchange(self, req, self._began, is_head=method == b"HEAD", local=local,
                             method=method)
        self.incoming = exchange
        if self.current is None:
            self.current = exchange
            exchange.start()
        else:
            self.queue.append(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self.incoming
        if exchange is not None:
            exchange.on_body(body, exchange is self.current)

    def on_message_complete(self) -> None:
        exchange = self.incoming
        if exchange is None:
            return
        if self.upgrading and (exchange.req.chunked or exchange.req.length > 0):
            return  # llhttp skipped the body of an Upgrade request: _after_upgrade reads it
        self.incoming = None
        if not self.keep_alive:
            self.discarding = True  # nothing after a request that closes the connection
        exchange.on_request_done(exchange is self.current)

    def _after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped at an Upgrade request. The proxy never upgrades (nginx neither,
        unless told to): the request is served as an ordinary one, so a new parser reads
        its body (after a stand-in head of the same framing) and whatever follows."""
        self.upgrading = False
        self.parser = httptools.HttpRequestParser(self)
        exchange = self.incoming
        if exchange is not None:
            self.synthetic = True
            framing = (b"Transfer-Encoding: chunked\r\n" if exchange.req.chunked
                       else b"Content-Length: %d\r\n" % exchange.req.length)
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
        if rest and not self.discarding:
            self._feed(rest)

    # -- exchanges -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.gone:
            return
        if self.proxy.corked:
            if not self.out:
                self.proxy.dirty.append(self)
            self.out.append(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            if not self.gone:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def exchange_done(self, exchange: _Exchange) -> None:
        """The current exchange's answer went out whole: report it, start the next one."""
        if exchange is not self.current:
            return
        if not exchange.request_done:
            # Answered before the body was read: nginx's lingering close drops the rest.
            exchange.record(exchange.status)
            self.current = None
            self.incoming = None
            self._close(linger=True)
            return
        self.finish(exchange, abort=False)

    def finish(self, exchange: _Exchange, *, abort: bool) -> None:
        exchange.record(exchange.status)
        self.current = None
        if self.refusal and not abort:
            self.write(rules.error_answer(self.refusal))
            self._close(linger=True)
            return
        if abort or not exchange.keep_client:
            self._close(linger=False)
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.backlog -= nxt.pending_bytes
            self.current = nxt
            nxt.start()
            self._update_reading()
        elif self.proxy.closing:
            self._close(linger=False)
            return
        self._update_deadline()

    def _drop_queue(self) -> None:
        for queued in self.queue:
            queued.discard()
        self.queue.clear()
        self.backlog = 0

    def _close(self, *, linger: bool) -> None:
        self._drop_queue()
        self.discarding = True
        self.flush()
        if linger and not self.gone and self.transport.can_write_eof():
            # Send what we have and the FIN, then read and drop the client's leftovers a
            # while, so its unread bytes do not turn our answer into a reset.
            self.lingering = True
            assert self.proxy.loop is not None
            self.deadline = self.proxy.loop.time() + LINGER_S
            self.transport.write_eof()
            if self.read_paused:
                self.read_paused = False
                self.transport.resume_reading()
        else:
            self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request we will not forward, count why, and close."""
        refused = self.proxy.stats.refused
        refused[reason] = refused.get(reason, 0) + 1
        self.keep_alive = False
        self.discarding = True
        if self.incoming is not None and self.incoming is not self.current:
            self.incoming = None
        current = self.current
        if current is not None and current.request_done:
            self.refusal = status  # the answer in progress goes out first
            return
        if current is not None:  # its own body was refused: it ends here
            self.current = None
            current.abandon(status)
        self.incoming = None
        self.write(rules.error_answer(status))
        self._close(linger=True)

    # -- flow control and timeouts ---------------------------------------------------------

    def _update_reading(self) -> None:
        pause = self.upstream_full or self.backlog > BACKLOG_MAX
        if pause != self.read_paused and not self.gone and not self.discarding:
            self.read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _update_deadline(self) -> None:
        if self.lingering or self.gone or self.write_paused:
            return  # the linger or send deadline stands
        loop = self.proxy.loop
        assert loop is not None
        incoming = self.incoming
        if incoming is not None and incoming is self.current:
            self.deadline = loop.time() + self.proxy.timeouts.client_body
        elif self.current is not None:
            self.deadline = 0.0  # waiting on the model: the upstream's read timeout rules
        elif self.in_head:
            if not self.deadline:
                self.deadline = loop.time() + self.proxy.timeouts.client_header
        else:
            self.deadline = loop.time() + self.proxy.timeouts.keepalive

    def expired(self) -> None:
        """This connection's deadline passed: close it (nginx answers nothing either)."""
        self.deadline = 0.0
        exchange = self.current
        self.current = None
        if not self.lingering:
            self.proxy.stats.client_timeouts += 1
            if exchange is not None and not exchange.finished:
                exchange.abandon(408)
        self._drop_queue()
        if self.write_paused:
            self.transport.abort()
        else:
            self.transport.close()


def _http_0_9(data: bytes) -> bool:
    """A request line without a version (HTTP/0.9). llhttp would wait for a blank line
    that a 0.9 client never sends; nginx 1.22 still serves it, headerless. The proxy
    refuses it at once: a 0.9 answer has no status, so no model's answer could be told
    from an error."""
    end = data.find(b"\n", 0, 8192)
    if end < 0:
        return False
    line = data[:end].strip()
    return bool(line) and b" HTTP/" not in line


class _Upstream(asyncio.Protocol):
    """One connection to the model server; serves one exchange at a time."""

    def __init__(self, proxy: RequestProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.waiting: list[bytes] = []            # written before the connection was made
        self.waiting_bytes = 0
        self.out: list[bytes] = []
        self.reused = False
        self.idle_since = 0.0
        self.deadline = 0.0
        self.write_paused = False
        self.on_drain: Callable[[], None] | None = None
        self.reusable = False
        self.stray = False
        self.framing = rules.NO_BODY
        self.final = False
        self.done = False
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self.read_at = 0.0

    def attach(self, exchange: _Exchange, *, reused: bool) -> None:
        self.exchange = exchange
        exchange.upstream = self
        self.reused = reused
        self.final = self.done = self.stray = False
        if reused:
            assert self.proxy.loop is not None
            self.deadline = self.proxy.loop.time() + self.proxy.timeouts.read
            if exchange.client.write_paused:
                self.pause()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.waiting.append(data)
            self.waiting_bytes += len(data)
            if self.waiting_bytes > BACKLOG_MAX and self.exchange is not None:
                self.pause_writing()  # hold the client until the connection is made
        elif self.proxy.corked:
            if not self.out:
                self.proxy.dirty.append(self)
            self.out.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def detach_and_close(self) -> None:
        self.exchange = None
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        if self.transport is not None:
            self.transport.close()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.connecting = None
        proxy = self.proxy
        proxy.upstreams.add(self)
        proxy.stats.upstream_connections += 1
        assert proxy.loop is not None
        if self.exchange is None:
            transport.close()
            return
        self.deadline = proxy.loop.time() + proxy.timeouts.read
        if self.waiting:
            waiting, self.waiting, self.waiting_bytes = self.waiting, [], 0
            transport.writelines(waiting)
            if self.write_paused and not transport.get_write_buffer_size() > WRITE_HIGH:
                self.resume_writing()
        if self.exchange.client.write_paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self.done:
            self.stray = True
            self.transport.close()  # bytes nobody asked for: this connection is not trusted
            return
        exchange.answered = True
        self.read_at = 0.0  # a streamed answer's body: read once per read, in on_body
        proxy = self.proxy
        assert proxy.loop is not None
        self.deadline = proxy.loop.time() + proxy.timeouts.read
        proxy.corked = True
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                if not self.done:
                    self._fail(502, f"bad answer: {exc}")
                    return
                self.stray = True
            if self.done:
                self._complete()
        finally:
            proxy.uncork()

    def eof_received(self) -> bool | None:
        exchange = self.exchange
        if exchange is not None and self.final and self.framing == rules.CLOSE_BODY \
                and not self.done:
            self.done = True
            self.reusable = False
            self._complete()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.upstreams.discard(self)
        try:
            self.proxy.idle.remove(self)
        except ValueError:
            pass
        if self.exchange is not None and not self.done:
            self._fail(502, f"upstream closed the connection ({exc!r})" if exc
                       else "upstream closed the connection")

    def pause_writing(self) -> None:
        self._hold_client(True)

    def resume_writing(self) -> None:
        self._hold_client(False)
        drain, self.on_drain = self.on_drain, None
        if drain is not None:
            drain()

    def _hold_client(self, full: bool) -> None:
        """The model's buffer is full (or drained): stop (or resume) reading its client."""
        self.write_paused = full
        exchange = self.exchange
        if exchange is not None:
            exchange.client.upstream_full = full
            exchange.client._update_reading()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.final:
            self.stray = True  # a second answer to one request
        self._headers, self._trailers, self._reason = [], [], b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.final:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise httptools.HttpParserError("101 without an upgrade")
            exchange.on_interim(status, self._reason, self._headers)
            return
        if self.final:
            return
        self.final = True
        self._status = status
        self.reusable = parser.should_keep_alive()
        self.framing = exchange.on_answer_head(status, self._reason, self._headers)
        if exchange.is_head:
            self.done = True
            # llhttp does not know the request was HEAD: start afresh for the next answer.
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.stray = True
            return
        exchange = self.exchange
        if exchange is not None and self.final:
            stream = exchange.stream
            if stream is not None:
                at = self.read_at
                if not at:
                    at = self.read_at = _now()
                stream.read_at(at, self.proxy)
            if exchange.out_chunked:
                exchange.client.write(b"%x\r\n%b\r\n" % (len(body), body))
            else:
                exchange.client.write(body)

    def on_message_complete(self) -> None:
        if self.final and not self.done:
            self.done = True
        elif not self.final:
            self._headers, self._reason = [], b""  # an interim answer ended

    # -- completion ------------------------------------------------------------------------

    def _complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        self.exchange = None
        self.deadline = 0.0
        reusable = (self.reusable and not self.stray and exchange.request_sent
                    and exchange.request_done and self.framing != rules.CLOSE_BODY)
        exchange.on_answer_done(self._trailers)
        if reusable and not self.transport.is_closing():
            self.proxy.release(self)
        else:
            self.transport.close()

    def _fail(self, status: int, reason: str) -> None:
        exchange = self.exchange
        self.exchange = None
        self.deadline = 0.0
        if self.transport is not None:
            self.transport.close()
        if exchange is not None:
            exchange.on_upstream_failed(status, reason)

    def failed(self, status: int, reason: str) -> None:
        """The connection could not be made."""
        self.connecting = None
        if self.exchange is not None:
            self._fail(status, reason)

    def expired(self) -> None:
        """No answer byte within the read timeout (or no connection within connect's)."""
        self.deadline = 0.0
        if self.connecting is not None:
            self.connecting.cancel()  # -> failed(504)
            return
        if self.exchange is not None:
            self._fail(504, "no answer in time")
        else:
            self.transport.close()


__all__ = ["ProxyStats", "ProxyTimeouts", "RequestProxy"]
