"""A tiny model server in the SageMaker hosting contract, for trying the agent.

`GET /ping` answers 200 when healthy; `POST /invocations` takes rows of 3 features
(`[[1, 2, 3], ...]`) and returns the linear model's predictions (examples/model.py),
or a flat JSON list of numbers and returns their mean and sum of squares. Standard library
only. It listens on `SAGEMAKER_BIND_TO_PORT` (default 8080) on 127.0.0.1, or
`SAMPLE_SERVER_HOST`.
`?sleep_ms=N` adds latency, `?status=N` forces a status, and `?chunks=N&chunk_ms=M`
streams a chunked answer, for testing metrics; request bodies may be chunked.

SIGTERM (how SageMaker stops a container) and SIGINT stop it gracefully, as gunicorn and
uvicorn do: it stops accepting, finishes the answers in flight (up to `STOP_WAIT_S`), exits 0.
Killed mid-answer instead, a client would get a broken answer that the agent counts as a 502.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("sample_server")


_MODEL = None
STOP_WAIT_S = 20.0  # inside the agent's TELEMETRY_STOP_GRACE (25 s) and SageMaker's 30 s


class InFlight:
    """How many requests are being answered, so a stop can wait for them."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0
        self.stopping = False

    def __enter__(self) -> None:
        with self._changed:
            self._count += 1

    def __exit__(self, *_: object) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


IN_FLIGHT = InFlight()


def model() -> object:
    """The linear model, fitted on first use (so `/ping` answers at once)."""
    global _MODEL
    if _MODEL is None:
        from examples.model import LinearModel

        _MODEL = LinearModel()
    return _MODEL


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes: without TCP_NODELAY a kept-alive client waits
    # ~40 ms for the delayed ACK on every request (Nagle).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        with IN_FLIGHT:
            self._get()

    def do_POST(self) -> None:  # noqa: N802
        with IN_FLIGHT:
            self._post()

    def _get(self) -> None:
        if urlparse(self.path).path == "/ping":
            self._reply(200, b"")
        else:
            self._reply(404, b'{"error": "not found"}')

    def _post(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = self._body()
        if url.path != "/invocations":
            self._reply(404, b'{"error": "not found"}')
            return
        if "sleep_ms" in query:
            time.sleep(float(query["sleep_ms"][0]) / 1000)
        if "status" in query:
            self._reply(int(query["status"][0]), b'{"forced": true}')
            return
        if "chunks" in query:  # a streamed answer: N chunks, chunk_ms apart
            self._stream(int(query["chunks"][0]), float(query.get("chunk_ms", ["0"])[0]))
            return
        try:
            data = json.loads(body or b"[]")
            if data and isinstance(data[0], list):  # rows of features: the model's job
                answer = {"predictions": model().predict(data)}
                log.info("predicted rows=%d", len(data))
                self._reply(200, json.dumps(answer).encode())
                return
            values = [float(v) for v in data]
        except (ValueError, TypeError):
            self._reply(400, b'{"error": "expected a JSON list of numbers or of rows of 3"}')
            return
        result = {"mean": sum(values) / len(values) if values else 0.0,
                  "prediction": sum(v * v for v in values)}
        log.info("predicted n=%d", len(values))
        self._reply(200, json.dumps(result).encode())

    def _body(self) -> bytes:
        """The request body, by Content-Length or chunked (large ones are counted, not kept)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length > 1 << 20:  # an upload test: read it through, answer its size
            left = length
            while left:
                left -= len(self.rfile.read(min(left, 1 << 20)))
            return json.dumps([float(length)]).encode()
        return self.rfile.read(length)

    def _stream(self, chunks: int, pause_ms: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self._end_headers()
        for i in range(chunks):
            piece = f"chunk {i}\n".encode()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(pause_ms / 1000)
        self.wfile.write(b"0\r\n\r\n")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._end_headers()
        self.wfile.write(body)

    def _end_headers(self) -> None:
        if IN_FLIGHT.stopping:  # stopping: this answer ends its connection
            self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.info("%s %s", self.address_string(), format % args)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host = os.environ.get("SAMPLE_SERVER_HOST", "127.0.0.1")
    port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
    ThreadingHTTPServer.request_queue_size = 1024  # the default 5 refuses bursts
    server: ThreadingHTTPServer | None = None

    def stop(signum: int, _frame: object) -> None:
        if server is None:  # still starting: nothing to finish
            raise KeyboardInterrupt
        if IN_FLIGHT.stopping:  # a second signal: stop waiting
            raise SystemExit(128 + signum)
        IN_FLIGHT.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()  # ends serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:  # a signal at any moment, even while starting, is a clean stop
        server = ThreadingHTTPServer((host, port), Handler)
        log.info("listening on %s:%d", host, port)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.server_close()  # no new connections; the answers in flight go on
    if server is not None and not IN_FLIGHT.wait_idle(STOP_WAIT_S):
        log.warning("stopped with answers in flight after %.0f s", STOP_WAIT_S)
    log.info("stopped")


if __name__ == "__main__":
    main()
