"""Datagram intake: the StatsD/DogStatsD UDP listener and the hooks' Unix socket.

Both speak StatsD lines (see `agent.rules.statsd`). Each datagram is parsed on
arrival: samples go to `on_samples`, the requests of the hooks' compact tally
lines to `on_records`; nothing here blocks or raises on bad input: malformed
lines are counted. The Unix socket is created with mode 0600 inside a
directory only this user can enter, so another user of the container cannot
feed or read it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.log import first_or_every, get_logger
from agent.model import RequestRecord
from agent.rules.statsd import Sample, split_datagram

RECEIVE_BUFFER = 4 << 20  # room for bursts while the loop is busy elsewhere
# A Unix socket's path must fit sun_path: 108 bytes with its NUL on Linux, 104 on macOS.
SOCKET_PATH_MAX = 103
SHORT_TMP = "/tmp"

_log = get_logger("statsd")


class DatagramIntake(asyncio.DatagramProtocol):
    """Parses each datagram and passes the samples and requests on; counts what it could
    not use (requests arriving with no `on_records` are counted in `records` only)."""

    def __init__(self, on_samples: Callable[[list[Sample]], None],
                 on_records: Callable[[list[RequestRecord]], None] | None = None) -> None:
        self._on_samples = on_samples
        self._on_records = on_records
        self.datagrams = 0
        self.malformed = 0
        self.records = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.datagrams += 1
        samples, records, bad = split_datagram(data)
        if bad:
            self.malformed += bad
            if first_or_every(self.malformed, 10_000, bad):
                _log.warning("statsd_malformed", lines=self.malformed, example=data[:120].decode(
                    "utf-8", "replace"))
        if samples:
            self._on_samples(samples)
        if records:
            self.records += len(records)
            if self._on_records is not None:
                self._on_records(records)

    def error_received(self, exc: Exception) -> None:  # pragma: no cover - kernel-level
        _log.warning("datagram_error", error=str(exc))


async def listen_udp(intake: DatagramIntake, host: str, port: int) -> asyncio.DatagramTransport:
    """StatsD over UDP on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind((host, port))
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: intake, sock=sock)
    return transport


def private_dir() -> Path:
    """A new directory only this user can enter, for the hook socket: under `$TMPDIR`, or
    under /tmp when `$TMPDIR` is so deep that the socket's path would not fit sun_path
    (a deep `TMPDIR`, as CI runners and pytest set, would otherwise switch the hooks off)."""
    made = Path(tempfile.mkdtemp(prefix="telemetry-agent-"))
    if len(os.fsencode(made / "hooks.sock")) <= SOCKET_PATH_MAX:
        return made
    try:
        short = Path(tempfile.mkdtemp(prefix="telemetry-agent-", dir=SHORT_TMP))
    except OSError:
        return made  # no usable /tmp: the bind fails and says so, as it would have
    made.rmdir()
    return short


async def listen_unix(intake: DatagramIntake, path: Path) -> asyncio.DatagramTransport:
    """The hook socket at `path` (its directory is made private when the agent owns it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: intake, sock=sock)
    return transport


def drain(transport: asyncio.BaseTransport, limit: int = 10_000) -> int:
    """Hand the datagrams waiting in a listener's queue to its intake, at once: before
    the listener closes at shutdown (the child's last flush may still be queued)."""
    protocol = transport.get_protocol()
    held = transport.get_extra_info("socket")
    if held is None or not isinstance(protocol, DatagramIntake):
        return 0
    try:
        sock = held.dup()
    except OSError:
        return 0
    with sock:
        sock.setblocking(False)
        for count in range(limit):
            try:
                data = sock.recv(1 << 18)
            except OSError:  # BlockingIOError: nothing left
                return count
            protocol.datagram_received(data, None)
    return limit


class StatsdSource:
    """The hook socket (a private Unix datagram socket) and, when configured, StatsD over UDP:
    both feed one `DatagramIntake`.

    Args:
        intake: parses datagrams and passes samples and requests on.
        hook_socket: the socket's path; None makes a private temporary directory for it,
            removed again at `stop`.
        udp: (host, port) for StatsD, or None.
    """

    name = "statsd"

    def __init__(self, intake: DatagramIntake, *, hook_socket: Path | None,
                 udp: tuple[str, int] | None) -> None:
        self.intake = intake
        self._requested = hook_socket
        self._udp = udp
        self._made_dir: Path | None = None
        self.hook_socket: Path | None = None  # where the hooks find the agent, once bound
        self.transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> None:
        """Bind the hook socket, then the UDP port. A failure is logged and that listener
        stays off (the child runs regardless); raises nothing."""
        path = self._requested
        try:
            if path is None:
                self._made_dir = private_dir()
                path = self._made_dir / "hooks.sock"
            self.transports.append(await listen_unix(self.intake, path))
            self.hook_socket = path
        except OSError as exc:
            _log.error("hook_socket_unavailable", path=str(path or tempfile.gettempdir()),
                       error=str(exc))
        if self._udp is not None:
            host, port = self._udp
            try:
                self.transports.append(await listen_udp(self.intake, host, port))
            except OSError as exc:
                _log.error("statsd_unavailable", address=f"{host}:{port}", error=str(exc),
                           hint="set TELEMETRY_STATSD to a free host:port, or off")

    async def stop(self, deadline: float) -> None:
        """Take what waits in the sockets' queues (a hook's exit flush), then close them and
        remove the socket (and the temporary directory the agent made for it)."""
        for transport in self.transports:
            drain(transport)
            transport.close()
        self.transports.clear()
        if self.hook_socket is not None:
            self.hook_socket.unlink(missing_ok=True)
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)

    def counters(self) -> dict[str, int]:
        return {"datagrams": self.intake.datagrams,
                "datagram_lines_malformed": self.intake.malformed}
