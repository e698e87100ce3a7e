"""In-process hooks for Python model servers: time inference, report it to the agent.

    from agent import hooks

    @hooks.inference              # or: with hooks.inference(): ...
    def predict(x): ...

    app = hooks.ASGIMiddleware(app)   # FastAPI/Starlette/any ASGI app
    app = hooks.WSGIMiddleware(app)   # Flask/any WSGI app (gunicorn workers too)
    hooks.record(status=200, model_s=0.012)

Each /invocations request is sent to the agent as one StatsD datagram on the Unix
socket named by `TELEMETRY_HOOK_SOCKET` (the agent sets it for its child):
`sagemaker.invocation:<model ms>|ms|#status:<code>[,container_ms:<ms>]`. A hook
never raises into the model and never blocks: the socket is non-blocking, and a
datagram that cannot be sent (no agent, a full queue) is dropped and counted in
`dropped()`. Imports only the standard library, so it costs nothing to import.
Safe under threads, asyncio and forked workers: each process opens its own
socket on first use.

With the middleware, ModelLatency is the time inside an `inference` block or
decorated function during the request (the whole request when there is none),
and ContainerLatency the whole request as the application saw it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["ASGIMiddleware", "WSGIMiddleware", "dropped", "inference", "record", "send"]

_lock = threading.Lock()
_socket: socket.socket | None = None
_socket_pid = 0
_socket_path = ""
_dropped = 0
# Inference time accumulated inside the current request (set by the middleware).
_model_time: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "agent_hooks_model_time", default=None)


def dropped() -> int:
    """Datagrams this process could not hand to the agent."""
    return _dropped


def send(line: str) -> bool:
    """Send one StatsD line (or several, newline-separated) to the agent; never raises."""
    global _dropped
    try:
        _sock().send(line.encode())
    except BlockingIOError:  # the agent's queue is full: drop this one, keep the socket
        _dropped += 1
        return False
    except (OSError, ValueError):
        _dropped += 1
        _forget()  # the agent went away or restarted: reconnect on the next call
        return False
    return True


def _sock() -> socket.socket:
    """This process's socket, connected to the agent's (connected: no path lookup per send)."""
    global _socket, _socket_pid, _socket_path
    sock = _socket
    path = os.environ.get("TELEMETRY_HOOK_SOCKET", "")
    if sock is not None and _socket_pid == os.getpid() and _socket_path == path:
        return sock
    with _lock:  # first use, a forked worker, or a new path
        if not path:
            raise OSError("TELEMETRY_HOOK_SOCKET is not set")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        _socket, _socket_pid, _socket_path = sock, os.getpid(), path
        return sock


def _forget() -> None:
    global _socket
    with _lock:
        if _socket is not None and _socket_pid == os.getpid():
            try:
                _socket.close()
            except OSError:
                pass
        _socket = None


def record(*, status: int = 200, model_s: float, container_s: float | None = None) -> bool:
    """Report one /invocations request: its status and seconds in the model (and in the
    container, when known). Returns whether the datagram left."""
    try:
        line = f"sagemaker.invocation:{model_s * 1000:.3f}|ms|#status:{int(status)}"
        if container_s is not None:
            line += f",container_ms:{container_s * 1000:.3f}"
    except (TypeError, ValueError):
        return False
    return send(line)


class inference:  # noqa: N801 - reads as a verb: `with hooks.inference():`
    """Time the model's work, as a context manager or a decorator (sync or async).

    Inside a middleware-wrapped request the time is added to that request's
    ModelLatency; outside one, each block is reported as one invocation.
    """

    def __init__(self, func: Callable[..., Any] | None = None) -> None:
        self._func = func
        self._started: list[float] = []
        if func is not None:
            functools.update_wrapper(self, func)

    def __enter__(self) -> inference:
        self._started.append(time.perf_counter())
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        _finish(time.perf_counter() - self._started.pop(), 500 if exc_type else 200)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        func = self._func
        if func is None:  # used as @inference() with parentheses
            return inference(args[0])
        if inspect.iscoroutinefunction(func):
            return _timed_async(func, args, kwargs)
        started = time.perf_counter()
        status = 500
        try:
            result = func(*args, **kwargs)
            status = 200
            return result
        finally:
            _finish(time.perf_counter() - started, status)

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        return self if obj is None else functools.partial(self.__call__, obj)


async def _timed_async(func: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
    started = time.perf_counter()
    status = 500
    try:
        result = await func(*args, **kwargs)
        status = 200
        return result
    finally:
        _finish(time.perf_counter() - started, status)


def _finish(seconds: float, status: int) -> None:
    spent = _model_time.get()
    if spent is not None:
        spent[0] += seconds
    else:
        record(status=status, model_s=seconds)


def _is_invocation(path: str) -> bool:
    return path.startswith("/invocations")


class ASGIMiddleware:
    """Reports every HTTP request to /invocations of an ASGI app."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any],
                       send_: Callable[..., Any]) -> None:
        if scope.get("type") != "http" or not _is_invocation(scope.get("path", "")):
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
