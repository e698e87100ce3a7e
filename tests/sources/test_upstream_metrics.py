"""Fetching the model server's /metrics: bounded in time and size, every framing, shared
by concurrent scrapes. Real sockets on 127.0.0.1, raw HTTP answers written by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest

from agent.sources.upstream_metrics import MetricsPage, fetch

PAGE = b"# HELP up_total u\n# TYPE up_total counter\nup_total 1.0\n"


async def serve(answer: bytes | None, delay: float = 0.0,
                requests: list[bytes] | None = None) -> tuple[asyncio.Server, int]:
    """A server that reads the request head, waits `delay`, writes `answer` and closes
    (None: never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if requests is not None:
            requests.append(head)
        if answer is None:
            await asyncio.sleep(30)
        await asyncio.sleep(delay)
        writer.write(answer or b"")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b"
    % (len(PAGE), PAGE),
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"10\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (PAGE[:16], len(PAGE) - 16, PAGE[16:]),
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + PAGE,  # ends at the close
], ids=["length", "chunked", "close"])
def test_every_framing_gives_the_whole_page(answer: bytes) -> None:
    """Content-Length, chunked and close-delimited answers all arrive whole, and the
    request asks for text 0.0.4 uncompressed."""
    async def main() -> None:
        seen: list[bytes] = []
        server, port = await serve(answer, requests=seen)
        async with server:
            got = await fetch("127.0.0.1", port)
        assert got.error is None and got.status == 200 and got.body == PAGE
        assert got.content_type == "text/plain"
        assert b"\r\nAccept: text/plain;version=0.0.4;q=1.0,*/*;q=0.1\r\n" in seen[0]
        assert b"\r\nAccept-Encoding: identity\r\n" in seen[0]
        assert seen[0].startswith(b"GET /metrics HTTP/1.1\r\n")
    run(main())


def test_cut_short_too_big_silent_refused() -> None:
    """A page cut short, one over the cap, a server that never answers (given `timeout`),
    a closed port: each an error, never a partial page, never longer than the timeout."""
    async def main() -> None:
        short = b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n" + PAGE
        big = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x 1\n" * 1250
        for answer, expected in ((short, "cut short"), (big, "over 1000 bytes")):
            server, port = await serve(answer)
            async with server:
                got = await fetch("127.0.0.1", port, max_bytes=1000)
            assert got.error is not None and expected in got.error and got.body == b""
        server, port = await serve(None)
        async with server:
            started = time.monotonic()
            got = await fetch("127.0.0.1", port, timeout=0.3)
            assert 0.3 <= time.monotonic() - started < 2
        assert got.error == "no whole answer within 0.3 s"
        server.close()
        await server.wait_closed()
        got = await fetch("127.0.0.1", port)
        assert got.error is not None and "ConnectionRefused" in got.error
    run(main())


def test_concurrent_scrapes_share_one_fetch() -> None:
    """Eight scrapes while a fetch is in flight make one request to the model server, and
    all get the merged page; a later scrape fetches again."""
    async def main() -> None:
        seen: list[bytes] = []
        answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                  b"Content-Length: %d\r\n\r\n%b" % (len(PAGE), PAGE))
        server, port = await serve(answer, delay=0.2, requests=seen)
        page = MetricsPage(lambda: b"# TYPE agent_x gauge\nagent_x 1\n", ("127.0.0.1", port))
        async with server:
            pages = await asyncio.gather(*(page() for _ in range(8)))
            assert len(seen) == 1
            assert set(pages) == {PAGE + b"# TYPE agent_x gauge\nagent_x 1\n"}
            await page()
            assert len(seen) == 2
        assert page.counters()["metrics_page_merged"] == 2
    run(main())


def test_no_page_upstream_counts_and_serves_the_agents() -> None:
    """404 upstream: the agent's page, counted as served alone."""
    async def main() -> None:
        server, port = await serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        page = MetricsPage(lambda: b"agent_x 1\n", ("127.0.0.1", port))
        async with server:
            assert await page() == b"agent_x 1\n"
        assert page.counters()["metrics_page_alone"] == 1
    run(main())
