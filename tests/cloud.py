"""A real CloudWatch stand-in for the tests: moto's server, and a fault-injecting proxy.

`MotoServer` runs `python -m moto.server` on 127.0.0.1 as a separate process.
`FaultProxy` sits between the agent and moto: it sees every request the agent
sends (decoded: gzip, JSON for Logs, CBOR for CloudWatch), checks nothing by
itself, and on demand answers with throttling errors, 503s, refused
connections or slow answers. `limit_violations` checks each seen request
against the API limits, since moto enforces almost none of them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import cbor2

from tests.conftest import SAFE_AWS

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's HTTP server in its own process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.url,
                            aws_access_key_id=SAFE_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=SAFE_AWS["AWS_SECRET_ACCESS_KEY"])


@dataclass
class Seen:
    """One request the proxy received."""

    api: str
    body: Any
    wire_bytes: int
    raw_bytes: int
    answer: str  # "forwarded", "throttled", "503", "invalid", "auth", "denied", "slow"


@dataclass
class Faults:
    """What the proxy does to the next requests; change it at any time."""

    throttle_rate: float = 0.0
    status_503: bool = False
    slow_s: float = 0.0           # forward, then hold the answer this long
    slow_count: int = 0           # how many requests to slow down (then normal)
    invalid_api: str | None = None  # answer this API once with InvalidParameterException
    reject_credentials: bool = False  # answer everything 400 UnrecognizedClientException
    deny_apis: frozenset[str] = frozenset()  # answer these APIs 400 AccessDeniedException
    apis: frozenset[str] = frozenset({"PutLogEvents", "PutMetricData"})


@dataclass
class FaultProxy:
    """An HTTP/1.1 proxy to `upstream` port with injectable faults (runs in a thread)."""

    upstream: int
    faults: Faults = field(default_factory=Faults)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._rng = random.Random(7)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.listen(True)

    # -- control --------------------------------------------------------------------------------

    def listen(self, on: bool) -> None:
        """Accept connections (on) or refuse them, closing the open ones (off)."""
        asyncio.run_coroutine_threadsafe(self._listen(on), self._loop).result(10)

    async def _listen(self, on: bool) -> None:
        if on and self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      reuse_address=True)
        elif not on and self._server is not None:
            self._server.close()
            self._server = None
            for task in asyncio.all_tasks():
                if task.get_name().startswith("conn"):
                    task.cancel()

    def stop(self) -> None:
        self.listen(False)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def calls(self, api: str, answer: str | None = None) -> list[Seen]:
        return [s for s in list(self.seen) if s.api == api and (answer is None or s.answer == answer)]

    # -- one connection -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.current_task().set_name("conn")  # type: ignore[union-attr]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answer = await self._answer(lines[0], headers, head, body)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()

    async def _answer(self, request_line: str, headers: dict[str, str], head: bytes,
                      body: bytes) -> bytes:
        api, decoded, raw = _decode(request_line, headers, body)
        faults = self.faults
        targeted = api in faults.apis
        verdict = "forwarded"
        if faults.status_503:
            verdict = "503"
        elif faults.reject_credentials:
            verdict = "auth"
        elif api in faults.deny_apis:
            verdict = "denied"
        elif faults.invalid_api == api:
            faults.invalid_api = None
            verdict = "invalid"
        elif targeted and self._rng.random() < faults.throttle_rate:
            verdict = "throttled"
        elif targeted and faults.slow_count > 0:
            faults.slow_count -= 1
            verdict = "slow"
        self.seen.append(Seen(api, decoded, len(body), raw, verdict))
        cbor = "cbor" in headers.get("content-type", "")
        if verdict == "503":
            return _response(503, b"Service Unavailable", "text/plain")
        if verdict in ("throttled", "invalid", "auth", "denied"):
            code = {"throttled": "ThrottlingException", "invalid": "InvalidParameterException",
                    "auth": "UnrecognizedClientException",
                    "denied": "AccessDeniedException"}[verdict]
            error = {"__type": f"com.amazonaws#{code}", "message": f"injected {verdict}"}
            payload = cbor2.dumps(error) if cbor else json.dumps(error).encode()
            return _response(400, payload, "application/cbor" if cbor else
                             "application/x-amz-json-1.1",
                             {"x-amzn-query-error": f"{code.removesuffix('Exception')};Sender"}
                             if cbor else None)
        answer = await _forward(self.upstream, head, body)
        if verdict == "slow":
            await asyncio.sleep(faults.slow_s)
        return answer


def _decode(request_line: str, headers: dict[str, str], body: bytes) -> tuple[str, Any, int]:
    target = headers.get("x-amz-target", "")
    api = target.rpartition(".")[2] if target else request_line.split()[1].rstrip("/").rpartition("/")[2]
    raw = gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body
    try:
        decoded = cbor2.loads(raw) if "cbor" in headers.get("content-type", "") else json.loads(raw)
    except ValueError:
        decoded = None
    return api, decoded, len(raw)


def _response(status: int, payload: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> bytes:
    reason = {400: "Bad Request", 503: "Service Unavailable"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             f"Content-Length: {len(payload)}", "x-amzn-RequestId: injected"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _forward(port: int, head: bytes, body: bytes) -> bytes:
    """Send one request to moto on a fresh connection; return its whole answer, keep-alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        answer_head = await reader.readuntil(b"\r\n\r\n")
        lines = answer_head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            payload = await reader.readexactly(int(headers["content-length"]))
        else:
            payload = await reader.read()
        kept = [line for line in lines[1:] if line and not line.lower().startswith(
            ("connection:", "content-length:"))]
        out = "\r\n".join([lines[0], *kept, f"Content-Length: {len(payload)}",
                           "Connection: keep-alive"])
        return out.encode("latin-1") + b"\r\n\r\n" + payload
    finally:
        writer.close()


# -- the limits every request must respect (docs/architecture.md) --------------------------------


def limit_violations(seen: list[Seen]) -> list[str]:
    """Each way a seen request breaks a PutLogEvents or PutMetricData limit."""
    problems = []
    for n, s in enumerate(seen):
        if s.api == "PutLogEvents":
            events = s.body["logEvents"]
            size = sum(len(e["message"].encode()) + 26 for e in events)
            stamps = [e["timestamp"] for e in events]
            if not 1 <= len(events) <= 10_000:
                problems.append(f"#{n} PutLogEvents with {len(events)} events")
            if size > 1_048_576:
                problems.append(f"#{n} PutLogEvents of {size} bytes")
            if stamps != sorted(stamps) or stamps[-1] - stamps[0] > 24 * 3600 * 1000:
                problems.append(f"#{n} PutLogEvents timestamps unsorted or over 24 h")
            if any(len(e["message"].encode()) > 1_048_576 - 26 for e in events):
                problems.append(f"#{n} PutLogEvents event over 1 MB")
        elif s.api == "PutMetricData":
            data = s.body["MetricData"]
            if not 1 <= len(data) <= 1000:
                problems.append(f"#{n} PutMetricData with {len(data)} datums")
            if s.raw_bytes > 1_000_000:
                problems.append(f"#{n} PutMetricData body of {s.raw_bytes} bytes")
            if s.body["Namespace"].startswith("AWS/"):
                problems.append(f"#{n} PutMetricData to a reserved namespace")
            for d in data:
                values = list(d.get("Values", [])) + list(d.get("StatisticValues", {}).values())
                if len(d.get("Values", [])) > 150 or len(d.get("Dimensions", [])) > 30:
                    problems.append(f"#{n} PutMetricData datum over 150 values or 30 dimensions")
                if not all(math.isfinite(float(v)) for v in values):
                    problems.append(f"#{n} PutMetricData non-finite value")
    return problems
