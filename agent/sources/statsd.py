"""Datagram intake: the StatsD/DogStatsD UDP listener and the hooks' Unix socket.

Both speak StatsD lines (see `agent.rules.statsd`). Each datagram is parsed on
arrival and handed to `on_samples`; nothing here blocks or raises on bad input:
malformed lines are counted. The Unix socket is created with mode 0600 inside a
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
from agent.rules.statsd import Sample, parse_datagram

RECEIVE_BUFFER = 4 << 20  # room for bursts while the loop is busy elsewhere

_log = get_logger("statsd")


class DatagramIntake(asyncio.DatagramProtocol):
    """Parses each datagram and passes the samples on; counts what it could not use."""

    def __init__(self, on_samples: Callable[[list[Sample]], None]) -> None:
        self._on_samples = on_samples
        self.datagrams = 0
        self.malformed = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.datagrams += 1
        samples, bad = parse_datagram(data)
        if bad:
            self.malformed += bad
            if self.malformed in (1, 100, 10_000):
                _log.warning("statsd_malformed", lines=self.malformed, example=data[:120].decode(
                    "utf-8", "replace"))
        if samples:
            self._on_samples(samples)

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
