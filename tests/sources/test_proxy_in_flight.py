"""The proxy's in-flight count (ConcurrentRequestsPerModel) on real sockets, in process.

Every way a request can end — answered, abandoned by its client, queued behind a
pipelined one and dropped, timed out by a silent model — must take it out of the
count exactly once, or the gauge drifts forever; and a burst shorter than the
sampling second still sets the second's Maximum.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from agent.model import RequestRecord
from agent.sources.proxy import ProxyTimeouts, RequestProxy
from tests.cloud import free_port

pytestmark = pytest.mark.timeout(30)


class Model:
    """An upstream that holds each request until `release` is set (or forever: `silent`)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Queue[bytes]()
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await self.arrived.put(head)
                if b"silent" in head:
                    await asyncio.sleep(30)
                await self.release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


Rig = tuple[RequestProxy, Model, list[RequestRecord], list[tuple[int, int, float]]]


def with_rig(scenario: Callable[[Rig], Awaitable[None]]) -> None:
    """Run `scenario` against a proxy (read timeout 0.5 s) in front of a `Model`."""

    async def main() -> None:
        model = Model()
        port = free_port()
        model.server = await asyncio.start_server(model.serve, "127.0.0.1", port)
        records: list[RequestRecord] = []
        samples: list[tuple[int, int, float]] = []
        proxy = RequestProxy(("127.0.0.1", free_port()), ("127.0.0.1", port), records.append,
                             timeouts=ProxyTimeouts(read=0.5),
                             on_concurrency=lambda low, high, mean, at, span: samples.append(
                                 (low, high, mean)))
        await proxy.start()
        try:
            await scenario((proxy, model, records, samples))
        finally:
            await proxy.close(0.1)
            model.server.close()

    asyncio.run(main())


async def _until(condition: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


POST = b"POST /invocations HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\n\r\n"


def test_pipelined_requests_dropped_with_their_connection_leave_the_count() -> None:
    with_rig(_pipelined)


async def _pipelined(rig: Rig) -> None:
    proxy, model, records, samples = rig
    _, writer = await asyncio.open_connection(*proxy.listen)
    writer.write(POST * 3)  # three in the container: one at the model, two queued
    await model.arrived.get()
    await _until(lambda: proxy.in_flight == 3)
    writer.close()  # the client leaves: 499 for the first, the queued ones are dropped
    await _until(lambda: proxy.in_flight == 0)
    assert [r.status for r in records] == [499]
    proxy._report()
    assert samples[-1][:2] == (0, 3)


def test_answered_and_timed_out_requests_all_leave() -> None:
    with_rig(_answered_and_timed_out)


async def _answered_and_timed_out(rig: Rig) -> None:
    proxy, model, records, samples = rig
    silent = asyncio.open_connection(*proxy.listen)
    reader, writer = await silent
    writer.write(POST.replace(b"/invocations", b"/invocations?silent"))
    answer = await reader.readuntil(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 504")  # the model stayed silent past the read timeout
    await model.arrived.get()
    model.release.set()
    writers = []
    for _ in range(8):  # a burst of 8, answered at once
        reader, writer = await asyncio.open_connection(*proxy.listen)
        writer.write(POST)
        writers.append((reader, writer))
    for reader, _ in writers:
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
    await _until(lambda: proxy.in_flight == 0)
    proxy._report()
    assert max(high for _, high, _ in samples) >= 1
    assert sorted(r.status for r in records) == [200] * 8 + [504]
    for _, writer in writers:
        writer.close()


def test_a_burst_shorter_than_a_second_sets_the_maximum() -> None:
    with_rig(_burst)


async def _burst(rig: Rig) -> None:
    proxy, model, _, samples = rig
    conns = [await asyncio.open_connection(*proxy.listen) for _ in range(8)]
    for _, writer in conns:
        writer.write(POST)
    await _until(lambda: proxy.in_flight == 8)
    model.release.set()
    for reader, _ in conns:
        await reader.readuntil(b"ok")
    await _until(lambda: proxy.in_flight == 0)
    proxy._report()
    low, high = min(s[0] for s in samples), max(s[1] for s in samples)
    assert (low, high) == (0, 8)
    assert all(0 <= mean <= 8 for _, _, mean in samples)
    for _, writer in conns:
        writer.close()
