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
import socket
from collections.abc import Callable
from pathlib import Path

from agent.log import get_logger
from agent.model import RequestRecord
from agent.rules.statsd import Sample, split_datagram

RECEIVE_BUFFER = 4 << 20  # room for bursts while the loop is busy elsewhere

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
            if self.malformed in (1, 100, 10_000):
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
