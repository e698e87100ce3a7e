"""Differential conformance of the agent's proxy, with a real nginx as the oracle.

One nginx and one agent (proxy only, no child) run for the whole module, each in front
of its own `ScriptedUpstream`; every case sends the same raw client bytes to both and
compares what each client got (status, body, framing, end-to-end headers) and what each
model server got (request line, fields, body and its framing, how many times).

nginx is configured as the agent's proxy behaves (`tests.proxy_peers.Nginx`): HTTP/1.1
keep-alive upstream, request buffering on, response buffering off, the same timeouts,
and `proxy_next_upstream error non_idempotent` (stock nginx would not retry a POST on a
stale keep-alive connection; the agent does, like nginx with that setting).

Where the agent deliberately differs from nginx the test says so and checks both sides,
so that the difference is shown to be real: an upstream `1xx` (nginx 1.22 takes it for
the final answer), upstream trailers (nginx drops them, the agent relays them as trailers
to HTTP/1.1 clients), fields named in `Connection:` and `Proxy-Connection`/`Trailer`/
`HTTP2-Settings` (nginx forwards them, RFC 9110 §7.6.1 says strip), HTTP/0.9 (nginx
still serves it), Host of an absolute-form target (RFC 9112 §3.2.2), Server and Date.

`PROXY_CONFORMANCE_SUBJECT=nginx` puts a second nginx in the agent's place: every case
then passes, except the agent-only ones, which are strict xfails. That validates the
harness itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import AGENT, agent_events, base_env
from tests.integration.test_requests import VARIANT, invocation_datums
from tests.proxy_peers import (
    CRLF,
    Client,
    Exchange,
    Nginx,
    Response,
    ScriptedUpstream,
    UpstreamRequest,
    finals,
    free_port,
    raw_exchange,
    upstream_connections,
    wait_for,
    wait_listening,
)

pytestmark = pytest.mark.timeout(150)

READ_S, CONNECT_S, HEADER_S, BODY_S, SEND_S, KEEPALIVE_S = 3, 2, 2, 2, 2, 10
SUBJECT = os.environ.get("PROXY_CONFORMANCE_SUBJECT", "agent")
T = TypeVar("T")


# -- the two proxies ------------------------------------------------------------------------

@dataclass
class Peer:
    name: str
    port: int
    upstream: ScriptedUpstream
    is_agent: bool
    nginx: Nginx | None = None
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None

    def pids(self) -> list[int]:
        if self.nginx is not None:
            return self.nginx.worker_pids
        return [self.proc.pid] if self.proc is not None else []

    def settle(self) -> None:
        """No pooled upstream connection left: the model server closes its idle ones and
        we wait (a while) for the proxy to have let them go."""
        self.upstream.drop_idle()
        wait_for(lambda: not [c for c in upstream_connections(self.pids(), self.upstream.port)
                              if c.status in ("ESTABLISHED", "CLOSE_WAIT")], 2)

    def stop(self) -> list[dict[str, Any]]:
        """Stop; the agent's own log events."""
        events: list[dict[str, Any]] = []
        if self.nginx is not None:
            self.nginx.stop()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            assert self.workdir is not None
            events = agent_events((self.workdir / "stderr").read_bytes())
        self.upstream.stop()
        return events


def start_nginx(name: str) -> Peer:
    upstream = ScriptedUpstream()
    try:
        nginx = Nginx(upstream.port, read_timeout=READ_S, connect_timeout=CONNECT_S,
                      send_timeout=SEND_S, client_header_timeout=HEADER_S,
                      client_body_timeout=BODY_S, keepalive_timeout=KEEPALIVE_S)
    except BaseException:
        upstream.stop()
        raise
    return Peer(name, nginx.port, upstream, False, nginx=nginx)


def start_agent(workdir: Path) -> Peer:
    """`telemetry-agent run` with no child: the proxy alone, nginx's timeouts."""
    upstream = ScriptedUpstream()
    port = free_port()
    env = base_env(workdir, TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{port}",
                   TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{upstream.port}",
                   TELEMETRY_PROXY_TIMEOUT=str(READ_S),
                   TELEMETRY_PROXY_CONNECT_TIMEOUT=str(CONNECT_S),
                   TELEMETRY_PROXY_CLIENT_HEADER_TIMEOUT=str(HEADER_S),
                   TELEMETRY_PROXY_CLIENT_BODY_TIMEOUT=str(BODY_S),
                   TELEMETRY_PROXY_SEND_TIMEOUT=str(SEND_S),
                   TELEMETRY_PROXY_KEEPALIVE_TIMEOUT=str(KEEPALIVE_S))
    with open(workdir / "stderr", "wb") as err:
        proc = subprocess.Popen([*AGENT, "run"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    peer = Peer("agent", port, upstream, True, proc=proc, workdir=workdir)
    try:
        wait_listening(port, proc=proc)
    except BaseException:
        peer.stop()
        raise AssertionError("the agent's proxy did not start: "
                             + (workdir / "stderr").read_text(errors="replace")[-2000:]) from None
    return peer


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, Peer]]:
    """(oracle, subject): nginx, and the agent (or a second nginx to validate the suite)."""
    oracle = start_nginx("nginx")
    try:
        subject = (start_agent(tmp_path_factory.mktemp("agent")) if SUBJECT == "agent"
                   else start_nginx("nginx-as-subject"))
    except BaseException:
        oracle.stop()
        raise
    yield oracle, subject
    oracle.stop()
    subject.stop()


def both(peers: tuple[Peer, Peer], run: Callable[[Peer], T]) -> tuple[T, T]:
    """`run` against the oracle and the subject at the same time."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, p) for p in peers]
        return futures[0].result(), futures[1].result()


def agent_only(request: pytest.FixtureRequest, subject: Peer, why_nginx_fails: str) -> None:
    """A case whose oracle is the spec, not nginx: with nginx as the subject it must fail."""
    if not subject.is_agent:
        request.applymarker(pytest.mark.xfail(strict=True, reason=why_nginx_fails))


# -- requests and views ----------------------------------------------------------------------

def req(target: str, method: str = "POST", body: bytes = b"", headers: tuple[str, ...] = (),
        version: str = "HTTP/1.1", host: str | None = "h", length: bool = True) -> bytes:
    lines = [f"{method} {target} {version}".encode()]
    if host is not None:
        lines.append(f"Host: {host}".encode())
    if length and method not in ("GET", "HEAD"):
        lines.append(b"Content-Length: %d" % len(body))
    lines += [h.encode() for h in headers]
    return CRLF.join(lines) + CRLF + CRLF + body


def chunked(*pieces: bytes, trailers: tuple[str, ...] = ()) -> bytes:
    out = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p)
    return out + b"0\r\n" + b"".join(t.encode() + CRLF for t in trailers) + CRLF


def view(r: UpstreamRequest) -> dict[str, Any]:
    """What a model server got, comparable between the two proxies (Host aside)."""
    return {"line": r.request_line, "fields": sorted((n.lower(), v) for n, v in r.headers
                                                     if n.lower() != "host"),
            "hosts": len(r.header("host")), "body": r.body, "framing": r.framing}


def statuses(responses: list[Response]) -> list[int]:
    return [r.status for r in responses]


def ids(responses: list[Response]) -> list[str | None]:
    return [r.get("x-id") for r in finals(responses)]


# -- 1xx ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["early103", "continue100"])
def test_interim_answer_then_each_client_gets_its_own_answer(
        peers: tuple[Peer, Peer], case: str, request: pytest.FixtureRequest) -> None:
    """An upstream 1xx before the 200: the next request on the client's keep-alive
    connection, and the next client on the pooled upstream connection, get their own
    answers. Deliberate difference: nginx 1.22 takes any upstream 1xx for the final answer,
    relays its head, then the real 200 (head and all) as that answer's close-delimited
    body, and holds the connection until proxy_read_timeout; the next request is never
    answered. The agent relays 103 to HTTP/1.1 clients (a 100 nobody asked for may be
    dropped), then the 200."""
    _, subject = peers
    agent_only(request, subject, "nginx 1.22 takes an upstream 1xx for the final answer")
    client = Client(subject.port, timeout=READ_S + 3)
    try:
        client.send(req(f"/invocations?case={case}&id={case}-a", body=b"x"))
        client.read_responses(1)
        client.send(req(f"/invocations?id={case}-b"))
        got = client.read_responses(2)
    finally:
        client.close()
    after = raw_exchange(subject.port, req(f"/invocations?id={case}-c"), responses=1)
    interim = [r for r in got if r.status < 200]
    if case == "early103":
        assert statuses(interim) == [103], got
        assert interim[0].get("link") == "</style.css>; rel=preload"
    else:
        assert set(statuses(interim)) <= {100}, got
    assert statuses(finals(got)) == [200, 200] and ids(got) == [f"{case}-a", f"{case}-b"], got
    assert finals(got)[0].body == f"id={case}-a case={case} method=POST got=1\n".encode()
    assert ids(after.responses) == [f"{case}-c"], after.responses
    for rid in ("a", "b", "c"):
        assert len(subject.upstream.requests(f"{case}-{rid}")) == 1


# -- retries -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST"])
def test_stale_pooled_connection_is_retried_once(peers: tuple[Peer, Peer], method: str) -> None:
    """The keep-alive race: the model server drops a pooled connection just as the next
    request arrives on it (unread, RST). The request is sent again on a fresh connection,
    once; the client gets the 200 and never sees the failure."""
    rid = f"stale-{method}"

    def run(peer: Peer) -> tuple[list[Response], list[UpstreamRequest], list[Any]]:
        peer.settle()
        arm = raw_exchange(peer.port, req(f"/invocations?case=stale&id={rid}-arm", method),
                           responses=1)
        assert statuses(arm.responses) == [200], (peer.name, arm.data)
        ex = raw_exchange(peer.port, req(f"/invocations?id={rid}", method,
                                         b"ab" if method == "POST" else b""), responses=1)
        armed = [c for c in peer.upstream.conns_with(f"id={rid}-arm ".encode())]
        return ex.responses, peer.upstream.requests(rid), armed

    for peer, (answer, reads, armed) in zip(peers, both(peers, run), strict=True):
        assert statuses(answer) == [200] and ids(answer) == [rid], (peer.name, answer)
        assert len(reads) == 1, (peer.name, "read by the model server more than once", reads)
        assert len(armed) == 1 and "stale_dropped" in armed[0].events, (peer.name, armed)
        assert f"id={rid} ".encode() in armed[0].raw, (
            peer.name, "the request was not first sent on the pooled connection")
        assert reads[0].conn != armed[0].number and not reads[0].reused, (peer.name, reads)


@pytest.mark.parametrize("connection", ["fresh", "reused"])
def test_upstream_crash_after_reading_the_request(peers: tuple[Peer, Peer],
                                                  connection: str) -> None:
    """The model server reads the whole request, then closes without a byte of answer:
    502. On a fresh connection the request reached the model exactly once. On a reused
    one nginx cannot tell this from the keep-alive race and sends it once more, on a fresh
    connection (which crashes too): exactly twice, never more. The agent must match."""
    rid = f"crash-{connection}"

    def run(peer: Peer) -> tuple[list[Response], list[tuple[bool, int]], list[Response]]:
        peer.settle()
        if connection == "reused":
            warm = raw_exchange(peer.port, req(f"/invocations?id={rid}-warm"), responses=1)
            assert statuses(warm.responses) == [200], (peer.name, warm.data)
        ex = raw_exchange(peer.port, req(f"/invocations?case=crash&id={rid}"), responses=1)
        after = raw_exchange(peer.port, req(f"/invocations?id={rid}-after"), responses=1)
        reads = [(r.reused, r.conn) for r in peer.upstream.requests(rid)]
        return ex.responses, reads, after.responses

    for peer, (answer, reads, after) in zip(peers, both(peers, run), strict=True):
        assert statuses(answer) == [502], (peer.name, answer)
        if connection == "fresh":
            assert [reused for reused, _ in reads] == [False], (peer.name, reads)
        else:
            assert [reused for reused, _ in reads] == [True, False], (peer.name, reads)
        assert statuses(after) == [200], (peer.name, "still serving", after)


# -- trailers and request bodies --------------------------------------------------------------

def test_request_trailers_never_become_headers(peers: tuple[Peer, Peer]) -> None:
    body = chunked(b"abc", b"de", trailers=("Host: evil", "X-Req-Trailer: 1"))
    data = req("/invocations?id=rtrail", headers=("Transfer-Encoding: chunked",), host="good",
               length=False) + body

    def run(peer: Peer) -> tuple[list[Response], list[UpstreamRequest], bytes]:
        ex = raw_exchange(peer.port, data, responses=1)
        return ex.responses, peer.upstream.requests("rtrail"), peer.upstream.raw()

    (n_resp, n_reads, _), (a_resp, a_reads, a_raw) = both(peers, run)
    assert statuses(a_resp) == statuses(n_resp) == [200]
    assert len(a_reads) == 1 and a_reads[0].header("host") == ["good"], a_reads
    assert b"evil" not in a_raw and b"X-Req-Trailer" not in a_raw
    assert a_reads[0].body == b"abcde" and a_reads[0].header("content-length") == ["5"]
    assert view(a_reads[0]) == view(n_reads[0])


def test_upstream_trailers_stay_out_of_the_header_section(peers: tuple[Peer, Peer]) -> None:
    """Deliberate difference: nginx drops upstream trailers (it re-chunks the body); the
    agent relays them as trailers to an HTTP/1.1 client. Neither puts them in the head."""
    data = req("/invocations?case=chunked&id=utrail")
    n, a = both(peers, lambda p: raw_exchange(p.port, data, responses=1).responses)
    assert [r.significant() for r in a] == [r.significant() for r in n], (n, a)
    assert a[0].framing == n[0].framing == "chunked"
    for peer, got in zip(peers, (n, a), strict=True):
        assert got[0].get("x-up-trailer") is None, (peer.name, got)
        assert got[0].trailers == ([("x-up-trailer", "t1")] if peer.is_agent else []), (
            peer.name, got[0].trailers)


@pytest.mark.parametrize("size", [5, 3 << 20])
def test_chunked_body_reaches_a_content_length_only_server(peers: tuple[Peer, Peer],
                                                           size: int) -> None:
    """The model server reads bodies by Content-Length only (as `http.server` does): a
    chunked request must reach it de-chunked with a Content-Length, or the chunks would
    be read as the next request and the next client would get garbage."""
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    pieces = [payload[i:i + 65536] for i in range(0, size, 65536)]
    rid = f"clonly-{size}"
    data = (req(f"/invocations?case=cl_only&id={rid}", headers=("Transfer-Encoding: chunked",),
                length=False) + chunked(*pieces))

    def run(peer: Peer) -> tuple[list[Response], list[Response], list[UpstreamRequest]]:
        first = raw_exchange(peer.port, data, responses=1, timeout=10)
        second = raw_exchange(peer.port, req(f"/invocations?case=cl_only&id={rid}-next",
                                             body=b"z"), responses=1)
        return first.responses, second.responses, peer.upstream.requests(rid)

    for peer, (first, second, reads) in zip(peers, both(peers, run), strict=True):
        assert ids(first) == [rid] and statuses(first) == [200], (peer.name, first)
        assert ids(second) == [f"{rid}-next"] and statuses(second) == [200], (peer.name, second)
        assert len(reads) == 1 and reads[0].body == payload, peer.name
        assert reads[0].header("content-length") == [str(size)], (peer.name, reads[0].headers)
        assert not reads[0].header("transfer-encoding"), (peer.name, reads[0].headers)
        assert not [e for e in peer.upstream.events() if e.startswith("bad_request")], peer.name


# -- HTTP/1.0 clients ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["keep-alive", "close", "chunked-upstream"])
def test_http10_client(peers: tuple[Peer, Peer], case: str) -> None:
    """An HTTP/1.0 client that asks for keep-alive gets `Connection: keep-alive` and may
    send another request; one that does not is closed after the answer; a chunked upstream
    answer reaches it de-chunked and close-delimited. The model always gets HTTP/1.1."""
    rid = f"h10-{case}"
    asks = ("Connection: Keep-Alive",) if case != "close" else ()
    upstream_case = "chunked" if case == "chunked-upstream" else "ok"

    def run(peer: Peer) -> tuple[list[Response], bool, list[Response], list[str]]:
        client = Client(peer.port, timeout=5)
        try:
            client.send(req(f"/invocations?case={upstream_case}&id={rid}", headers=asks,
                            version="HTTP/1.0", body=b"q"))
            got = client.read_responses(1)
            closed = case != "keep-alive" and client.wait_closed(3) is not None
            second: list[Response] = []
            if case == "keep-alive":
                client.send(req(f"/invocations?id={rid}-2", version="HTTP/1.0", headers=asks))
                second = finals(client.read_responses(2))[1:]
        finally:
            client.close()
        lines = [r.request_line for r in peer.upstream.requests() if r.id and
                 r.id.startswith(rid)]
        return got, closed, second, lines

    (n_got, n_closed, n_second, n_lines), (a_got, a_closed, a_second, a_lines) = both(peers, run)
    assert [r.significant() for r in a_got] == [r.significant() for r in n_got], (n_got, a_got)
    for peer, got, closed, second, lines in ((peers[0], n_got, n_closed, n_second, n_lines),
                                             (peers[1], a_got, a_closed, a_second, a_lines)):
        assert statuses(got) == [200] and got[0].complete, (peer.name, got)
        assert got[0].framing != "chunked" and got[0].get("transfer-encoding") is None
        assert lines and all(line.endswith(" HTTP/1.1") for line in lines), (peer.name, lines)
        if case == "keep-alive":
            assert "keep-alive" in got[0].connection, (peer.name, got[0].headers)
            assert ids(second) == [f"{rid}-2"], (peer.name, second)
        else:
            assert closed, (peer.name, "an HTTP/1.0 connection without keep-alive stays open")
        if case == "chunked-upstream":
            assert got[0].framing == "close", (peer.name, got[0])
            assert got[0].body == f"id={rid} case=chunked method=POST got=1\n".encode()


# -- Expect: 100-continue ------------------------------------------------------------------------

@pytest.mark.parametrize("upstream_case", ["ok", "early413"])
def test_expect_100_continue(peers: tuple[Peer, Peer], upstream_case: str) -> None:
    """A client that waits for `100 Continue` before its body: with a normal model server it
    gets 100 then 200; with one that refuses at once (413 before reading the body) it gets
    the 413 quickly, not a 502 or 504 after a timeout. nginx (request buffering) answers
    100 itself, reads the body, then sends the request: the model never sees Expect."""
    rid = f"expect-{upstream_case}"

    def run(peer: Peer) -> tuple[list[Response], float, list[UpstreamRequest]]:
        client = Client(peer.port, timeout=5)
        started = time.monotonic()
        try:
            client.send(req(f"/invocations?case={upstream_case}&id={rid}", length=False,
                            headers=("Content-Length: 5", "Expect: 100-continue")))
            first = client.wait_interim_or_final(2)
            if not first or first[0].status == 100:
                client.send_raw(b"hello")
            got = client.read_responses(1)
        finally:
            client.close()
        took = time.monotonic() - started
        return got, took, peer.upstream.wait_requests(rid, 1, timeout=3)

    (n_got, _, n_reads), (a_got, a_took, a_reads) = both(peers, run)
    assert statuses(finals(a_got)) == statuses(finals(n_got)), (n_got, a_got)
    assert [r.significant() for r in finals(a_got)] == [r.significant() for r in finals(n_got)]
    assert a_took < 2.5, a_took
    for peer, reads in zip(peers, (n_reads, a_reads), strict=True):
        assert len(reads) == 1 and not reads[0].header("expect"), (peer.name, reads)
    if upstream_case == "ok":
        assert statuses(a_got) == statuses(n_got) == [100, 200], (n_got, a_got)
        assert a_reads[0].body == n_reads[0].body == b"hello"
    else:
        assert statuses(finals(a_got)) == [413]


# -- request targets and refusals -----------------------------------------------------------------

def test_absolute_form_target_reaches_the_model_in_origin_form(peers: tuple[Peer, Peer]) -> None:
    """Deliberate difference in Host: with `proxy_set_header Host $http_host` nginx passes
    the Host field (`y`); the agent takes the target's authority (`x`), as RFC 9112
    §3.2.2 asks. Both send one Host and an origin-form target."""
    data = (b"POST http://x/invocations?id=absform HTTP/1.1\r\nHost: y\r\n"
            b"Content-Length: 2\r\n\r\nhi")
    (n, n_reads), (a, a_reads) = both(peers, lambda p: (
        raw_exchange(p.port, data, responses=1).responses, p.upstream.requests("absform")))
    assert statuses(a) == statuses(n) == [200]
    assert [r.target for r in a_reads] == [r.target for r in n_reads] == ["/invocations?id=absform"]
    assert len(a_reads[0].header("host")) == 1 and a_reads[0].body == b"hi"
    assert n_reads[0].header("host") == ["y"]
    if peers[1].is_agent:
        assert a_reads[0].header("host") == ["x"]


MALFORMED = {
    "no-host-1.1": b"GET /invocations?id=%s HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET /invocations?id=%s HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "version-0.9": b"GET /invocations?id=%s HTTP/0.9\r\n\r\n",
    "version-2.0": b"GET /invocations?id=%s HTTP/2.0\r\nHost: a\r\n\r\n",
    "gzip-chunked": (b"POST /invocations?id=%s HTTP/1.1\r\nHost: a\r\n"
                     b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    "te-in-1.0": (b"POST /invocations?id=%s HTTP/1.0\r\nHost: a\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "cl-and-te": (b"POST /invocations?id=%s HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
}
# nginx 1.22: 400, 400, 400, 505, 501, 400, 400


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_refused_like_nginx(peers: tuple[Peer, Peer], case: str) -> None:
    rid = f"bad-{case}"
    data = MALFORMED[case] % rid.encode()

    def run(peer: Peer) -> tuple[Exchange, bytes]:
        ex = raw_exchange(peer.port, data, timeout=3)
        return ex, peer.upstream.raw()

    (n, n_raw), (a, a_raw) = both(peers, run)
    assert statuses(n.responses)[:1] in ([400], [501], [505]), n.data[:200]
    assert statuses(a.responses)[:1] == statuses(n.responses)[:1], (n.data[:100], a.data[:100])
    assert a.closed, "the connection stays open after a refused request"
    assert rid.encode() not in a_raw and rid.encode() not in n_raw


def test_http09_request_is_refused(peers: tuple[Peer, Peer],
                                   request: pytest.FixtureRequest) -> None:
    """Deliberate difference: nginx 1.22 still serves an HTTP/0.9 `GET /path` (a bare body
    back, and an HTTP/1.1 request *without Host* to the model); the agent refuses it (400)
    and the model gets nothing."""
    oracle, subject = peers
    agent_only(request, subject, "nginx serves HTTP/0.9 GET")
    data = b"GET /invocations?id=h09\r\n"
    n, a = both(peers, lambda p: raw_exchange(p.port, data, timeout=3))
    assert oracle.upstream.requests("h09") and n.data.startswith(b"id=h09 ")
    assert a.data.startswith(b"HTTP/1.1 400 ") and a.closed, a.data[:200]
    assert not subject.upstream.requests("h09") and b"id=h09" not in subject.upstream.raw()


# -- upgrades and pipelining -----------------------------------------------------------------------

def test_h2c_upgrade_on_a_post_is_served_normally(peers: tuple[Peer, Peer]) -> None:
    """Deliberate difference: nginx forwards HTTP2-Settings (named in Connection:); the
    agent strips it with the other hop-by-hop fields."""
    data = req("/invocations?id=h2c", body=b"abc", headers=(
        "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"))
    (n, n_reads), (a, a_reads) = both(peers, lambda p: (
        raw_exchange(p.port, data, responses=1).responses, p.upstream.requests("h2c")))
    assert [r.significant() for r in a] == [r.significant() for r in n] and statuses(a) == [200]
    for peer, reads in zip(peers, (n_reads, a_reads), strict=True):
        assert len(reads) == 1 and reads[0].body == b"abc", peer.name
        assert not reads[0].names & {"upgrade", "connection"}, (peer.name, reads[0].headers)
    assert "http2-settings" in n_reads[0].names
    if peers[1].is_agent:
        assert "http2-settings" not in a_reads[0].names, a_reads[0].headers


PIPELINES = {
    "three": (req("/invocations?id=pipe-1", body=b"1") + req("/invocations?id=pipe-2", "GET")
              + req("/invocations?id=pipe-3", body=b"333"), 3),
    "before-websocket": (req("/invocations?id=pipe-ws-1", body=b"1") + req(
        "/invocations?id=pipe-ws-2", "GET", headers=(
            "Upgrade: websocket", "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13")), 2),
}


@pytest.mark.parametrize("case", list(PIPELINES))
def test_pipelined_requests_are_answered_in_order(peers: tuple[Peer, Peer], case: str) -> None:
    """Requests sent in one write are answered in order, each with its own answer; an
    Upgrade request after an ordinary one does not swallow the first one's answer (nginx,
    without `proxy_set_header Upgrade`, serves it as an ordinary request)."""
    data, count = PIPELINES[case]
    n, a = both(peers, lambda p: raw_exchange(p.port, data, responses=count).responses)
    expected = [f"{'pipe' if case == 'three' else 'pipe-ws'}-{i}" for i in range(1, count + 1)]
    assert ids(n) == expected, n
    assert ids(a) == expected, a
    assert [r.significant() for r in a] == [r.significant() for r in n]


def test_http10_request_pipelined_before_an_http11_one_gets_no_chunks(
        peers: tuple[Peer, Peer]) -> None:
    """The client's HTTP version belongs to each request: a 1.1 request parsed behind a 1.0
    one (found by the fuzz) must not turn the 1.0 answer chunked. Its chunked upstream answer
    goes out close-delimited, so the connection ends there, as with nginx."""
    data = (req("/invocations?case=chunked&id=p10-1", version="HTTP/1.0",
                headers=("Connection: keep-alive",)) + req("/invocations?id=p10-2"))
    n, a = both(peers, lambda p: raw_exchange(p.port, data, responses=2, timeout=3))
    assert [r.framing for r in a.responses] == [r.framing for r in n.responses]
    assert a.responses[0].framing != "chunked" and a.closed and n.closed
    assert [r.significant() for r in a.responses] == [r.significant() for r in n.responses]


# -- answers without a body, close-delimited answers ----------------------------------------------

def test_head_204_304_never_carry_a_body(peers: tuple[Peer, Peer]) -> None:
    data = (req("/invocations?id=nb-204&status=204") + req("/invocations?id=nb-304&status=304")
            + req("/invocations?id=nb-head", "HEAD") + req("/invocations?id=nb-last", "GET"))
    n, a = both(peers, lambda p: raw_exchange(p.port, data, responses=4).responses)
    assert statuses(a) == statuses(n) == [204, 304, 200, 200], a
    assert ids(a) == ["nb-204", "nb-304", "nb-head", "nb-last"]
    assert [r.body for r in a[:3]] == [b"", b"", b""]
    assert a[3].body == b"id=nb-last case=ok method=GET got=0\n"
    assert [r.significant() for r in a] == [r.significant() for r in n]
    assert a[2].get("content-length") == n[2].get("content-length") == "37"  # as for GET


def test_close_delimited_answer_is_chunked_for_http11_clients(peers: tuple[Peer, Peer]) -> None:
    """The model answers without a length and closes; an HTTP/1.1 client gets it chunked,
    whole, and its connection survives for the next request."""
    data = req("/invocations?case=closedelim&id=cd&size=300000") + req("/invocations?id=cd-2")
    n, a = both(peers, lambda p: raw_exchange(p.port, data, responses=2, timeout=5))
    assert [r.significant() for r in a.responses] == [r.significant() for r in n.responses]
    assert [r.framing for r in a.responses] == [r.framing for r in n.responses] == [
        "chunked", "length"]
    assert len(a.responses[0].body) == len(b"id=cd case=closedelim method=POST got=0\n") + 300000
    assert ids(a.responses) == ["cd", "cd-2"] and not a.closed


# -- hop-by-hop ------------------------------------------------------------------------------------

def test_hop_by_hop_fields_are_stripped_both_ways(peers: tuple[Peer, Peer]) -> None:
    """Both strip Connection, Keep-Alive and TE (requests) and Connection and Keep-Alive
    (answers). Deliberate difference: nginx forwards fields named in Connection:,
    Proxy-Connection and Trailer both ways; the agent strips them (RFC 9110 §7.6.1)."""
    data = req("/invocations?case=hop&id=hop", headers=(
        "Connection: keep-alive, X-Named", "X-Named: 1", "Keep-Alive: timeout=5",
        "TE: trailers", "Proxy-Connection: keep-alive", "Trailer: X-Foo", "X-Kept: 1"))
    (n, n_reads), (a, a_reads) = both(peers, lambda p: (
        raw_exchange(p.port, data, responses=1).responses, p.upstream.requests("hop")))
    assert statuses(a) == statuses(n) == [200]
    for peer, got, reads in ((peers[0], n, n_reads), (peers[1], a, a_reads)):
        assert len(reads) == 1 and reads[0].header("x-kept") == ["1"], peer.name
        assert not reads[0].names & {"connection", "keep-alive", "te"}, (peer.name, reads)
        assert got[0].get("keep-alive") is None and got[0].get("x-up-kept") == "1", peer.name
        assert got[0].connection <= {"keep-alive"}, (peer.name, got[0].headers)
    # nginx: the fixed set only
    assert {"x-named", "proxy-connection", "trailer"} <= n_reads[0].names
    assert n[0].get("x-up-named") == "1" and n[0].get("proxy-connection") == "keep-alive"
    if peers[1].is_agent:
        assert not a_reads[0].names & {"x-named", "proxy-connection", "trailer"}, a_reads
        assert a[0].get("x-up-named") is None and a[0].get("proxy-connection") is None, a


# -- model server's answer shapes ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["close", "http10", "die", "silent"])
def test_upstream_answer_shapes(peers: tuple[Peer, Peer], case: str) -> None:
    """`close` (Connection: close after the answer), `http10` (an HTTP/1.0 answer, then
    close): relayed, the client's connection kept, the dead upstream connection not reused.
    `die` (closes mid-body): the client gets the head and the partial body, then its
    connection is closed. `silent`: 504 after the read timeout."""
    rid = f"shape-{case}"

    def run(peer: Peer) -> tuple[Any, Any, float]:
        started = time.monotonic()
        ex = raw_exchange(peer.port, req(f"/invocations?case={case}&id={rid}")
                          + req(f"/invocations?id={rid}-next"), responses=2,
                          timeout=READ_S + 3)
        took = time.monotonic() - started
        after = raw_exchange(peer.port, req(f"/invocations?id={rid}-after"), responses=1)
        return ex, after, took

    (n, n_after, n_took), (a, a_after, a_took) = both(peers, run)
    assert statuses(a.responses) == statuses(n.responses), (n.responses, a.responses)
    if case in ("close", "http10"):  # the model's answers (not a proxy's own error page)
        assert [r.significant() for r in a.responses] == [r.significant() for r in n.responses]
    assert ids(a_after.responses) == ids(n_after.responses) == [f"{rid}-after"]
    if case == "die":
        assert statuses(a.responses) == [200] and not a.responses[0].complete and a.closed
        assert a.responses[0].body == b"0123456789"
    elif case == "silent":
        # nginx answers its own 504 (and 502) keep-alive: the request was whole, so the
        # client's next request (pipelined here) is served; statuses above compare it.
        assert statuses(a.responses)[:1] == [504] and READ_S - 0.5 < a_took < READ_S + 2
        assert abs(a_took - n_took) < 1.5
    else:
        assert ids(a.responses) == [rid, f"{rid}-next"] and not a.closed
        assert [r.framing for r in a.responses] == [r.framing for r in n.responses]


# -- client timeouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["header", "body"])
def test_slow_client_is_closed_after_its_timeout(peers: tuple[Peer, Peer], phase: str) -> None:
    """Slowloris: a head dribbled one field every 0.3 s is closed when the client header
    timeout (2 s, for the whole head, however it dribbles) runs out; a body that stops
    coming is closed after the client body timeout. nginx sends nothing (408 in its log).
    Nothing reaches the model."""
    rid = f"slow-{phase}"
    limit = HEADER_S if phase == "header" else BODY_S

    def run(peer: Peer) -> float | None:
        client = Client(peer.port, timeout=5)
        started = time.monotonic()
        try:
            if phase == "header":
                client.send(f"POST /invocations?id={rid} HTTP/1.1\r\nHost: h\r\n".encode())
                while time.monotonic() - started < limit + 3:
                    if client.wait_closed(0.3) is not None:
                        return time.monotonic() - started
                    try:
                        client.send_raw(b"X-Dribble: 1\r\n")
                    except OSError:
                        return time.monotonic() - started
                return None
            client.send(req(f"/invocations?id={rid}", length=False,
                            headers=("Content-Length: 10",)) + b"abc")
            took = client.wait_closed(limit + 3)
            return None if took is None else time.monotonic() - started
        finally:
            client.close()

    n, a = both(peers, run)
    assert n is not None and limit - 0.3 < n < limit + 1, n
    assert a is not None, "the subject never closed the slow client"
    assert limit - 0.3 < a < limit + 1.5, a
    oracle, subject = peers
    assert rid.encode() not in oracle.upstream.raw()  # nginx buffers the body
    if phase == "header" or not subject.is_agent:
        assert rid.encode() not in subject.upstream.raw()
    else:
        # Deliberate difference: the agent streams a Content-Length body, so the model has
        # seen the head and "abc"; it must never get a whole request, and its connection
        # must be closed along with the client's.
        assert not subject.upstream.requests(rid)
        started = subject.upstream.conns_with(rid.encode())
        assert all(wait_for(c.closed.is_set, 2) for c in started), "model connection left open"


def test_client_that_never_reads_a_large_answer(peers: tuple[Peer, Peer]) -> None:
    """A 50 MiB answer to a client that never reads: after the send timeout both the
    client's and the model's connections are closed, and the model (which serves one
    request at a time: `big` holds its lock while it sends) then serves the next client."""

    def run(peer: Peer) -> tuple[list[str], float, float | None, int, list[Response]]:
        client = Client(peer.port, timeout=5)
        started = time.monotonic()
        try:
            client.send(req("/invocations?case=big&id=big", "GET"))
            cut = wait_for(lambda: peer.upstream.events("big"), SEND_S + 6)
            took = time.monotonic() - started
            client.keep = False
            closed = client.wait_closed(5) if cut else None
        finally:
            client.close()
        nxt = raw_exchange(peer.port, req("/invocations?case=serial&id=big-next"), responses=1,
                           timeout=5)
        return cut, took, closed, client.received, nxt.responses

    for peer, (cut, took, closed, received, nxt) in zip(peers, both(peers, run), strict=True):
        assert cut == ["send_failed big"], (peer.name, "the model's send was not cut", cut)
        assert SEND_S - 0.5 < took < SEND_S + 4, (peer.name, took)
        assert closed is not None and received < 50 << 20, (peer.name, closed, received)
        assert ids(nxt) == ["big-next"], (peer.name, nxt)


# -- counting ----------------------------------------------------------------------------------

def test_aborted_requests_are_counted(peers: tuple[Peer, Peer], tmp_path: Path) -> None:
    """20 clients leave before a slow model answers: each is one invocation with status
    499 (the agent's Invocations and 4XX errors, `proxy_client_aborts`); nginx's access log,
    the oracle, says 499 for each. The model's connections are closed, not left to answer."""
    oracle, subject = peers
    counted = start_agent(tmp_path) if subject.is_agent else subject

    def run(peer: Peer) -> list[str]:
        clients = []
        for i in range(20):
            client = Client(peer.port)
            client.send(req(f"/invocations?case=slow&ms=2500&id=abort-{i}"))
            clients.append(client)
        arrived = wait_for(lambda: len([r for r in peer.upstream.requests() if r.id and
                                        r.id.startswith("abort-")]) == 20, 5)
        for client in clients:
            client.close()
        assert arrived, (peer.name, "not all 20 requests reached the model")
        done = wait_for(lambda: len([e for e in peer.upstream.events()
                                     if e.split(" ")[-1].startswith("abort-")]) == 20, 5)
        return [e.split(" ")[0] for e in peer.upstream.events() if done and
                e.split(" ")[-1].startswith("abort-")]

    try:
        n_events, a_events = both((oracle, counted), run)
    finally:
        events = counted.stop() if counted is not subject else []
    assert n_events == ["proxy_left"] * 20, n_events
    assert oracle.nginx is not None
    nginx_log = wait_for(lambda: [line for line in oracle.nginx.access_log()  # type: ignore
                                  if "id=abort-" in line], 3)
    assert [line.split(" ")[0] for line in nginx_log] == ["499"] * 20, nginx_log
    if counted is not subject:
        datums = invocation_datums(tmp_path / "calls.jsonl")
        stopped = next(e for e in events if e["event"] == "agent_stopped")
        assert stopped["proxy_client_aborts"] == 20 and stopped["proxy_requests"] == 20, stopped
        assert datums[("Invocations", VARIANT)]["sum"] == 20
        assert datums[("Invocation4XXErrors", VARIANT)]["sum"] == 20  # 499: client left
        assert datums.get(("Invocation5XXErrors", VARIANT), {"sum": 0})["sum"] == 0
    assert a_events == ["proxy_left"] * 20, ("the model kept working for clients gone", a_events)


# -- over the whole module ------------------------------------------------------------------------

def test_the_model_only_ever_saw_http11_and_never_desynchronised(
        peers: tuple[Peer, Peer]) -> None:
    """Runs last: over every case above, each request the model read had an HTTP/1.1
    request line and the model never read garbage where a request should start."""
    for peer in peers:
        lines = [r.request_line for r in peer.upstream.requests()]
        assert lines, peer.name
        assert all(line.endswith(" HTTP/1.1") for line in lines), (peer.name, lines)
        assert not [e for e in peer.upstream.events() if e.startswith("bad_request")], peer.name
