"""A tiny model server in the SageMaker hosting contract, for trying the agent.

`GET /ping` answers 200 when healthy; `POST /invocations` takes rows of 3 features
(`[[1, 2, 3], ...]`) and returns the linear model's predictions (examples/model.py),
or a flat JSON list of numbers and returns their mean and sum of squares. Standard library
only. It listens on `SAGEMAKER_BIND_TO_PORT` (default 8080) on 127.0.0.1, or
`SAMPLE_SERVER_HOST`.
`?sleep_ms=N` adds latency, `?status=N` forces a status, and `?chunks=N&chunk_ms=M`
streams a chunked answer, for testing metrics; request bodies may be chunked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("sample_server")


_MODEL = None


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
        if urlparse(self.path).path == "/ping":
            self._reply(200, b"")
        else:
            self._reply(404, b'{"error": "not found"}')

    def do_POST(self) -> None:  # noqa: N802
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
        self.end_headers()
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
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.info("%s %s", self.address_string(), format % args)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host = os.environ.get("SAMPLE_SERVER_HOST", "127.0.0.1")
    port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
    ThreadingHTTPServer.request_queue_size = 1024  # the default 5 refuses bursts
    server = None
    try:  # a Ctrl-C at any moment, even while starting, is a clean stop
        server = ThreadingHTTPServer((host, port), Handler)
        log.info("listening on %s:%d", host, port)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.server_close()
        log.info("stopped")


if __name__ == "__main__":
    main()
