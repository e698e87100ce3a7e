"""The StatsD source's start: its listeners come up, or each failure costs only itself."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent.sources import statsd
from agent.sources.statsd import DatagramIntake, StatsdSource
from tests.cloud import free_port


def test_no_usable_tmp_costs_the_hook_socket_only(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`$TMPDIR` too deep for a socket path and no /tmp to fall back to: the hook socket is
    off (and logged), the UDP listener still starts, and `start` raises nothing (a raise
    would make the agent drop the whole source, UDP included)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(statsd.tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(statsd, "SHORT_TMP", str(tmp_path / "no-such-tmp"))
    samples: list[object] = []
    port = free_port()

    async def main() -> None:
        source = StatsdSource(DatagramIntake(samples.extend), hook_socket=None,
                              udp=("127.0.0.1", port))
        await source.start()
        try:
            assert source.hook_socket is None
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"queue_depth:5|g", ("127.0.0.1", port))
            for _ in range(200):
                if samples:
                    break
                await asyncio.sleep(0.01)
        finally:
            await source.stop(0.0)

    asyncio.run(main())
    assert len(samples) == 1
    assert list(deep.iterdir()) == []  # the unusable directory was not left behind
