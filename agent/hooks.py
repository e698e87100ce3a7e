"""In-process hooks for Python model servers: time inference, report it to the agent.

    from agent import hooks

    @hooks.inference              # or: with hooks.inference(): ...
    def predict(x): ...           # async def works too (and stays a coroutine function)

    app = hooks.ASGIMiddleware(app)   # FastAPI/Starlette/any ASGI app
    app = hooks.WSGIMiddleware(app)   # Flask/any WSGI app (gunicorn workers too)
    hooks.record(status=200, model_s=0.012)

A hook call only appends the request to this process's queue (a lock-free
`deque.append`: about what prometheus_client's `Histogram.observe` costs). A
daemon sender thread, started on first use, tallies the queue every 100 ms (or
as soon as 512 requests wait) into {(status, model µs, container µs): count} and
sends it to the Unix socket named by `TELEMETRY_HOOK_SOCKET` (the agent sets it
for its child) as StatsD-like lines, in datagrams of at most 60,000 bytes:

    sagemaker.invocation:<item>[:<item>...]|ms|#status:<code>
    item = <model ms>[/<container ms>][*<count>]        e.g. 12.5*3:13.001/15.2

one item per distinct latency (1 µs resolution), `*count` when it repeats. When
the agent's queue is full the tally is kept and retried 5 ms later, so a burst
loses nothing; what cannot be held (no `TELEMETRY_HOOK_SOCKET`, over 250,000
requests held while the agent is away, or arguments that are not numbers) is
counted in `dropped()`. A process that exits flushes what it holds (atexit: it
waits while the agent keeps reading, up to 10 s, giving up after 1 s without
progress; the ASGI middleware also flushes on the lifespan shutdown event);
`flush()` does it on demand.

A hook never raises into the model and never blocks. Safe under threads,
asyncio and forked workers: a forked child starts with an empty tally, its own
socket and its own sender thread, and never sends its parent's requests. Imports
only the standard library, so it costs nothing to import.

With the middleware, ModelLatency is the time inside an `inference` block or
decorated function during the request (the whole request when there is none),
and ContainerLatency the whole request as the application saw it.
"""

from __future__ import annotations

import atexit
import contextvars
import errno
import functools
import inspect
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["ASGIMiddleware", "WSGIMiddleware", "dropped", "flush", "inference", "record", "send"]

FLUSH_INTERVAL_S = 0.1  # the sender's period
FLUSH_AT = 512  # requests waiting that wake the sender before its period is up
RETRY_S = 0.005  # the agent's queue was full: try again this soon
MAX_HELD = 250_000  # requests kept while the agent cannot take them; beyond: dropped
MAX_DATAGRAM = 60_000  # bytes; Unix datagrams may be up to ~64 KiB by default
EXIT_STALL_S = 1.0  # at exit, how long to wait for the agent to make room
EXIT_WAIT_S = 10.0  # ... and at most in all, while it does
SEND_BUFFER = 4 << 20  # asked of the kernel (it caps it at net.core.wmem_max)
_HEAD = "sagemaker.invocation:"

_Item = tuple[int, float, "float | None"]
_Key = tuple[int, int, "int | None"]  # status, model µs, container µs

_pending: deque[_Item] = deque()  # what hook calls append; only the sender pops
_append = _pending.append
_held: dict[_Key, int] = {}  # tallied, not yet handed to the agent (oldest first)
_held_count = 0
_started = False  # the sender thread of this process
_state_lock = threading.Lock()  # socket and thread creation
_flush_lock = threading.Lock()  # one flush at a time
_count_lock = threading.Lock()
_wake = threading.Event()
_socket: socket.socket | None = None
_socket_path = ""
_max_datagram = MAX_DATAGRAM
_dropped = 0
# Inference time accumulated inside the current request (set by the middleware).
_model_time: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "agent_hooks_model_time", default=None)


def dropped() -> int:
    """Requests (and `send` datagrams) this process could not hand to the agent."""
    return _dropped


def record(*, status: int = 200, model_s: float, container_s: float | None = None) -> bool:
    """Report one /invocations request: its status and seconds in the model (and in the
    container, when known). Queued for the sender thread; returns False (and counts it
    in `dropped()`) only when the arguments are not numbers."""
    try:
        item = (int(status), float(model_s), None if container_s is None else float(container_s))
    except Exception:  # noqa: BLE001 - not numbers: never into the model
        _drop(1)
        return False
    if not _started:
        _start()
    _append(item)
    if len(_pending) == FLUSH_AT:
        _wake.set()
    return True


def flush(timeout: float = 0.0) -> bool:
    """Hand everything this process holds to the agent now (the sender thread does this
    every 100 ms by itself). With a timeout, wait up to that many seconds while the
    agent's queue is full: blocking, so not for a request's path. True when nothing is
    left. Never raises."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome = _flush_once()
        except Exception:  # noqa: BLE001 - never into the model
            return False
        if outcome == "done":
            return True
        if outcome == "gone" or time.monotonic() >= deadline:
            return False
        time.sleep(RETRY_S)


def send(line: str) -> bool:
    """Send one StatsD line (or several, newline-separated) to the agent at once, as
    one datagram; never raises, never blocks (a full queue drops it: see `dropped()`)."""
    try:
        data = line.encode()
        sock = _sock(os.environ.get("TELEMETRY_HOOK_SOCKET", ""))
    except (AttributeError, UnicodeError):  # not text
        sock = None
    if sock is None:
        _drop(1)
        return False
    try:
        sock.send(data)
    except BlockingIOError:  # the agent's queue is full: drop this one, keep the socket
        _drop(1)
        return False
    except OSError:
        _drop(1)
        _forget()  # the agent went away or restarted: reconnect on the next call
        return False
    return True


# -- the sender ----------------------------------------------------------------------------


def _drop(count: int) -> None:
    global _dropped
    with _count_lock:
        _dropped += count


def _start() -> None:
    """This process's sender thread (first use, or first use after a fork)."""
    global _started
    with _state_lock:
        if _started:
            return
        try:
            threading.Thread(target=_run, name="agent-hooks-sender", daemon=True).start()
        except RuntimeError:  # interpreter shutting down: atexit flushes what is queued
            pass
        _started = True


def _run() -> None:
    delay = FLUSH_INTERVAL_S
    wake = _wake
    while True:
        wake.wait(delay)
        wake.clear()
        try:
            outcome = _flush_once()
        except Exception:  # noqa: BLE001 - the sender must outlive any surprise
            outcome = "done"
        delay = RETRY_S if outcome == "full" else FLUSH_INTERVAL_S


def _flush_once() -> str:
    """Tally the queue and send the tally: "done" (nothing held), "full" (the agent's
    queue is full: retry soon) or "gone" (no agent to send to now)."""
    with _flush_lock:
        _tally()
        if not _held:
            return "done"
        path = os.environ.get("TELEMETRY_HOOK_SOCKET", "")
        if not path:  # no agent at all: nothing to wait for
            _discard(_held_count)
            return "done"
        sock = _sock(path)
        outcome = "gone" if sock is None else _send_held(sock)
        if _held_count > MAX_HELD:
            _discard(_held_count - MAX_HELD)
        return outcome


def _tally() -> None:
    """Move the queued requests into the tally, rounded to whole microseconds."""
    global _held_count
    pop, held = _pending.popleft, _held
    taken = bad = 0
    for _ in range(len(_pending)):
        status, model_s, container_s = pop()
        try:
            model = round(model_s * 1e6)
            container = None if container_s is None else round(container_s * 1e6)
        except (ValueError, OverflowError):  # nan, inf
            bad += 1
            continue
        if model < 0 or (container is not None and container < 0) or not 100 <= status <= 599:
            bad += 1
            continue
        key = (status, model, container)
        held[key] = held.get(key, 0) + 1
        taken += 1
    _held_count += taken
    if bad:
        _drop(bad)


def _discard(count: int) -> None:
    """Drop the oldest `count` held requests (whole entries, at least `count`)."""
    global _held_count
    gone = 0
    for key in list(_held):
        if gone >= count:
            break
        gone += _held.pop(key)
    _held_count -= gone
    _drop(gone)


def _send_held(sock: socket.socket) -> str:
    global _held_count, _max_datagram
    for data, keys, count in _datagrams(list(_held.items()), _max_datagram):
        try:
            sock.send(data)
        except BlockingIOError:
            return "full"
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE and _max_datagram > 2048:
                _max_datagram //= 2  # a kernel with smaller datagrams: split finer
                return "full"
            _forget()
            return "gone"
        for key in keys:
            del _held[key]
        _held_count -= count
    return "done"


def _ms(micros: int) -> str:
    whole, part = divmod(micros, 1000)
    return f"{whole}.{part:03d}".rstrip("0") if part else str(whole)


def _datagrams(entries: list[tuple[_Key, int]],
               limit: int) -> Iterator[tuple[bytes, list[_Key], int]]:
    """The tally as datagrams of at most `limit` bytes: (bytes, keys in it, requests)."""
    groups: dict[int, list[tuple[_Key, int]]] = {}
    for entry in entries:
        groups.setdefault(entry[0][0], []).append(entry)
    lines: list[str] = []  # finished lines of this datagram
    size = 0  # their bytes, newlines included
    keys: list[_Key] = []
    count = 0
    for status, group in groups.items():
        tail = f"|ms|#status:{status}"
        items: list[str] = []
        line_size = len(_HEAD) + len(tail) - 1  # less the separator the first item won't need
        for key, n in group:
            item = _ms(key[1])
            if key[2] is not None:
                item += "/" + _ms(key[2])
            if n > 1:
                item += f"*{n}"
            if size + (1 if lines else 0) + line_size + len(item) + 1 > limit and (items or lines):
                if items:
                    lines.append(_HEAD + ":".join(items) + tail)
                yield "\n".join(lines).encode(), keys, count
                lines, size, keys, count = [], 0, [], 0
                items, line_size = [], len(_HEAD) + len(tail) - 1
            items.append(item)
            line_size += len(item) + 1
            keys.append(key)
            count += n
        if items:
            size += (1 if lines else 0) + line_size
            lines.append(_HEAD + ":".join(items) + tail)
    if lines:
        yield "\n".join(lines).encode(), keys, count


def _sock(path: str) -> socket.socket | None:
    """This process's socket, connected to the agent's at `path` (None when there is none)."""
    global _socket, _socket_path
    sock = _socket
    if sock is not None and _socket_path == path:
        return sock
    if not path:
        return None
    with _state_lock:
        if _socket is not None and _socket_path == path:
            return _socket
        _close_socket()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:  # out of descriptors: try again next time
            return None
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            return None
        _socket, _socket_path = sock, path
        return sock


def _close_socket() -> None:
    global _socket
    sock, _socket = _socket, None
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _forget() -> None:
    with _state_lock:
        _close_socket()


def _after_fork_in_child() -> None:
    """A forked worker: its own (empty) tally, locks, socket and sender thread."""
    global _held_count, _started, _state_lock, _flush_lock, _count_lock, _wake, _dropped
    global _max_datagram
    _pending.clear()
    _held.clear()
    _held_count = 0
    _state_lock, _flush_lock, _count_lock = threading.Lock(), threading.Lock(), threading.Lock()
    _wake = threading.Event()
    _close_socket()
    _started = False
    _dropped = 0
    _max_datagram = MAX_DATAGRAM


def _at_exit() -> None:
    """Send what is held before the process goes: as long as the agent keeps taking it
    (up to EXIT_WAIT_S), giving up after EXIT_STALL_S without progress."""
    if not (_pending or _held):
        return
    try:
        started = progressed = time.monotonic()
        least = None
        while True:
            outcome = _flush_once()
            if outcome == "done":
                return
            now = time.monotonic()
            if outcome == "gone" or now - started > EXIT_WAIT_S:
                break
            if least is None or _held_count < least:
                least, progressed = _held_count, now
            elif now - progressed > EXIT_STALL_S:
                break
            time.sleep(RETRY_S)
        with _flush_lock:
            _tally()
            _discard(_held_count)  # lost with the process: at least count it
    except Exception:  # noqa: BLE001, S110 - exiting anyway
        pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


# -- timing --------------------------------------------------------------------------------


class inference:  # noqa: N801 - reads as a verb: `with hooks.inference():`
    """Time the model's work, as a context manager or a decorator (sync or async).

    Inside a middleware-wrapped request the time is added to that request's
    ModelLatency; outside one, each block is reported as one invocation. As a
    decorator it returns a plain function (`async def` for a coroutine function, so
    `inspect.iscoroutinefunction` still holds).
    """

    def __new__(cls, func: Callable[..., Any] | None = None) -> Any:
        if func is not None:
            return _timed(func)
        return super().__new__(cls)

    def __init__(self, func: Callable[..., Any] | None = None) -> None:
        self._started: list[float] = []

    def __enter__(self) -> inference:
        self._started.append(time.perf_counter())
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        _finish(time.perf_counter() - self._started.pop(), 500 if exc_type else 200)

    def __call__(self, func: Callable[..., Any]) -> Any:
        """`@hooks.inference()`, with parentheses."""
        return _timed(func)


def _timed(func: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            status = 500
            try:
                result = await func(*args, **kwargs)
                status = 200
                return result
            finally:
                _finish(time.perf_counter() - started, status)
        return timed_async

    @functools.wraps(func)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        status = 500
        try:
            result = func(*args, **kwargs)
            status = 200
            return result
        finally:
            _finish(time.perf_counter() - started, status)
    return timed


def _finish(seconds: float, status: int) -> None:
    spent = _model_time.get()
    if spent is not None:
        spent[0] += seconds
    else:
        record(status=status, model_s=seconds)


# -- middleware ----------------------------------------------------------------------------


def _is_invocation(path: str) -> bool:
    return path.startswith("/invocations")


class ASGIMiddleware:
    """Reports every HTTP request to /invocations of an ASGI app; flushes on the lifespan
    shutdown event."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any],
                       send_: Callable[..., Any]) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self._lifespan(scope, receive, send_)
            return
        if kind != "http" or not _is_invocation(scope.get("path", "")):
            await self.app(scope, receive, send_)
            return
        started = time.perf_counter()
        spent = [0.0]
        status = [500]
        token = _model_time.set(spent)

        async def watch(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
            await send_(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            _model_time.reset(token)
            total = time.perf_counter() - started
            record(status=status[0], model_s=spent[0] or total, container_s=total)

    async def _lifespan(self, scope: dict[str, Any], receive: Callable[..., Any],
                        send_: Callable[..., Any]) -> None:
        async def watch() -> Any:
            message = await receive()
            if isinstance(message, dict) and message.get("type") == "lifespan.shutdown":
                flush()  # the server has finished its requests
            return message

        try:
            await self.app(scope, watch, send_)
        finally:
            flush()


class WSGIMiddleware:
    """Reports every request to /invocations of a WSGI app (ends when the body is consumed)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not _is_invocation(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)
        started = time.perf_counter()
        spent = [0.0]
        status = [500]
        token = _model_time.set(spent)

        def watch(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            try:
                status[0] = int(status_line.split(" ", 1)[0])
            except ValueError:
                pass
            return start_response(status_line, headers, exc_info) if exc_info else \
                start_response(status_line, headers)

        try:
            body = self.app(environ, watch)
        except BaseException:
            _model_time.reset(token)
            record(status=500, model_s=spent[0] or time.perf_counter() - started,
                   container_s=time.perf_counter() - started)
            raise
        _model_time.reset(token)
        return _Closing(body, started, spent, status)


class _Closing:
    """Wraps a WSGI body so the request is recorded once the server has sent it all."""

    def __init__(self, body: Iterable[bytes], started: float, spent: list[float],
                 status: list[int]) -> None:
        self._body = body
        self._started, self._spent, self._status = started, spent, status

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            total = time.perf_counter() - self._started
            record(status=self._status[0], model_s=self._spent[0] or total, container_s=total)
