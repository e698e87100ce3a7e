"""The model server's own `/metrics`, fetched for the proxy's merged page.

`MetricsPage` is the proxy's `metrics_page` when TELEMETRY_PROXY_METRICS=true: at
each scrape it fetches the upstream's `/metrics` (one bounded HTTP/1.1 GET:
`FETCH_TIMEOUT_S` for all of it, at most `MAX_PAGE_BYTES` of body), then serves
that page followed by the agent's families (`agent.rules.exposition`). No page
upstream (404, refused, timeout, too big, not an exposition) means the agent's
page alone; each such case is counted and logged, rate-limited. Scrapes that
arrive while a fetch is in flight share it, so a burst of scrapers makes one
request to the model server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from agent.log import first_or_every, get_logger
from agent.rules.exposition import ACCEPT, AGENT_PREFIX, Merge, merge_pages

FETCH_TIMEOUT_S = 2.0
MAX_PAGE_BYTES = 8 << 20
MAX_HEAD_BYTES = 64 << 10
READ_SIZE = 1 << 16

_log = get_logger("metrics_page")


@dataclass(frozen=True, slots=True)
class Fetched:
    """An upstream answer: its status, content type and body; `error` when there was none."""

    status: int = 0
    content_type: str = ""
    body: bytes = b""
    error: str | None = None


class _Answer:
    """httptools callbacks collecting one answer."""

    def __init__(self) -> None:
        self.content_type = b""
        self.encoding = b""
        self.body: list[bytes] = []
        self.size = 0
        self.done = False
        self.headers_done = False
        self.framed = False  # Content-Length or Transfer-Encoding: the body does not end at EOF

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self.content_type = value
        elif lower == b"content-encoding":
            self.encoding = value.strip().lower()
        elif lower in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body.append(data)
        self.size += len(data)

    def on_message_complete(self) -> None:
        self.done = True


async def fetch(host: str, port: int, path: str = "/metrics", *,
                timeout: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_PAGE_BYTES) -> Fetched:
    """GET `path` from host:port, asking for text 0.0.4; never raises.

    Bounded: `timeout` seconds for connect, request and the whole answer, and at most
    `max_bytes` of body (and `MAX_HEAD_BYTES` of head) read, else an error.
    """
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {ACCEPT}\r\n"
               "Accept-Encoding: identity\r\nUser-Agent: sagemaker-telemetry-agent\r\n"
               "Connection: close\r\n\r\n").encode("latin-1")
    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            received = 0
            while not answer.done:
                data = await reader.read(READ_SIZE)
                if not data:
                    # httptools is never told of EOF: a body without length or chunks ends here
                    answer.done = answer.headers_done and not answer.framed
                    break
                received += len(data)
                parser.feed_data(data)
                if answer.size > max_bytes or (not answer.headers_done
                                               and received > MAX_HEAD_BYTES):
                    return Fetched(parser.get_status_code(), error=f"over {max_bytes} bytes")
    except TimeoutError:
        return Fetched(error=f"no whole answer within {timeout:g} s")
    except (OSError, httptools.HttpParserError) as exc:
        return Fetched(error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if writer is not None:
            writer.close()
    if not answer.done:
        return Fetched(parser.get_status_code() if answer.headers_done else 0,
                       error="answer cut short")
    if answer.encoding not in (b"", b"identity"):
        return Fetched(parser.get_status_code(), error="content-encoding "
                       + answer.encoding.decode("latin-1")[:40])
    return Fetched(parser.get_status_code(), answer.content_type.decode("latin-1"),
                   b"".join(answer.body))


class MetricsPage:
    """The proxy's `/metrics`: the upstream's page, then `local()`'s families.

    Args:
        local: renders the agent's own page (text 0.0.4).
        upstream: (host, port) of the model server.
        path: the upstream's metrics path.
        timeout: seconds for the whole upstream fetch.
        max_bytes: the largest upstream page taken.
    """

    def __init__(self, local: Callable[[], bytes], upstream: tuple[str, int], *,
                 path: str = "/metrics", timeout: float = FETCH_TIMEOUT_S,
                 max_bytes: int = MAX_PAGE_BYTES) -> None:
        self._local = local
        self._upstream = upstream
        self._path = path
        self._timeout = timeout
        self._max = max_bytes
        self._inflight: asyncio.Future[bytes] | None = None
        self._warned: set[str] = set()
        self.merged = 0
        self.alone = 0
        self.renamed = 0
        self.dropped = 0

    def __call__(self) -> asyncio.Future[bytes]:
        """A future page; scrapes while one is being made share it."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._page())
        return self._inflight

    def counters(self) -> dict[str, int]:
        return {"metrics_page_merged": self.merged, "metrics_page_alone": self.alone,
                "metrics_page_renamed": self.renamed, "metrics_page_dropped": self.dropped}

    async def _page(self) -> bytes:
        try:
            return await self._merged()
        except Exception as exc:  # noqa: BLE001 - a scrape must get the agent's page regardless
            _log.error("metrics_page_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            self._alone("failed")
            return self._local()

    async def _merged(self) -> bytes:
        got = await fetch(*self._upstream, self._path, timeout=self._timeout,
                          max_bytes=self._max)
        local = self._local()
        if got.error is not None or got.status != 200:
            self._alone(got.error or f"status {got.status}")
            return local
        merge = await asyncio.to_thread(merge_pages, local, got.body, got.content_type)
        self._report(merge)
        return merge.page

    def _report(self, merge: Merge) -> None:
        if not merge.upstream:
            self._alone(merge.refused or "unusable page")
            return
        self.merged += 1
        self.renamed += len(merge.renamed)
        self.dropped += len(merge.dropped)
        for name in (*merge.renamed, *merge.dropped):
            if name not in self._warned and len(self._warned) < 100:
                self._warned.add(name)
                renamed = name in merge.renamed
                _log.warning("metrics_family_renamed" if renamed else "metrics_family_dropped",
                             family=name, renamed_to=AGENT_PREFIX + name if renamed else None,
                             reason="the model server's /metrics uses that name")

    def _alone(self, reason: str) -> None:
        self.alone += 1
        if first_or_every(self.alone, 1000):
            _log.info("upstream_metrics_unavailable", reason=reason, times=self.alone,
                      upstream="%s:%d" % self._upstream, path=self._path)
