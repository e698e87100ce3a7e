"""A log line and the traceback it introduces reach CloudWatch Logs as one event.

Real processes under the real agent (file sink): a plain Python child that calls
`logging.exception`, and gunicorn serving a WSGI app that raises, whose workers
log `[ERROR] Error handling request ...` and the traceback.
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cloud import free_port
from tests.conftest import AGENT, base_env, log_messages, run_agent

pytestmark = pytest.mark.timeout(120)
PY = sys.executable

LOGGING_CHILD = """\
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("model")
for i in range(int(sys.argv[1])):
    print(f"request {i}", flush=True)
    log.info("handling %d", i)
    try:
        try:
            {}[i]
        except KeyError as exc:
            raise ValueError(f"boom {i}") from exc
    except ValueError:
        log.exception("Exception on /invocations [POST] number %d", i)
"""

WSGI_APP = """\
def app(environ, start_response):
    if environ["PATH_INFO"] == "/ping":
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    raise RuntimeError("model broke on " + environ["QUERY_STRING"])
"""


def test_logging_exception_is_one_event_each(tmp_path: Path) -> None:
    """N `logging.exception` calls -> N events, each the header line followed by the whole
    (chained) traceback; no traceback is left as an event of its own."""
    n = 300
    script = tmp_path / "child.py"
    script.write_text(LOGGING_CHILD)
    env = base_env(tmp_path, TELEMETRY_LOG_LEVEL="error")
    done = run_agent([PY, str(script), str(n)], env)
    assert done.returncode == 0, done.stderr[-2000:]
    messages = log_messages(tmp_path / "calls.jsonl")
    errors = [m for m in messages if m.startswith("ERROR model: ")]
    assert len(errors) == n
    for i, message in enumerate(errors):
        lines = message.split("\n")
        assert lines[0] == f"ERROR model: Exception on /invocations [POST] number {i}"
        assert lines[1] == "Traceback (most recent call last):"
        assert f"KeyError: {i}" in lines
        assert "The above exception was the direct cause of the following exception:" in lines
        assert lines[-1] == f"ValueError: boom {i}"
    assert not [m for m in messages if m.startswith("Traceback")]
    assert [m for m in messages if m.startswith("request ")] == [f"request {i}" for i in range(n)]
    assert [m for m in messages if m.startswith("INFO ")] == [
        f"INFO model: handling {i}" for i in range(n)]


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the agent exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("gunicorn did not start listening")


def test_gunicorn_error_and_traceback_are_one_event(tmp_path: Path) -> None:
    """gunicorn (2 workers) logs `[ERROR] Error handling request /invocations` and the
    traceback for each request its app fails: one event per failed request."""
    n = 60
    (tmp_path / "wsgi_app.py").write_text(WSGI_APP)
    port = free_port()
    env = base_env(tmp_path, TELEMETRY_LOG_LEVEL="error")
    proc = subprocess.Popen([*AGENT, "run", "--", PY, "-m", "gunicorn", "-w", "2", "-b",
                             f"127.0.0.1:{port}", "--chdir", str(tmp_path), "wsgi_app:app"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, proc)
        statuses = []
        for i in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", f"/invocations?{i}", body=b"{}")
            statuses.append(conn.getresponse().status)
            conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert statuses == [500] * n, err[-2000:]
    messages = log_messages(tmp_path / "calls.jsonl")
    errors = [m for m in messages if "[ERROR] Error handling request" in m]
    assert len(errors) == n, errors[:3]
    seen = set()
    for message in errors:
        lines = message.split("\n")
        number = lines[-1].rsplit(" ", 1)[-1]
        # gunicorn 22 writes the path; 23+ the method and path
        assert re.search(r"\[ERROR\] Error handling request (POST )?/invocations\?%s$" % number,
                         lines[0]), lines[0]
        assert lines[1] == "Traceback (most recent call last):"
        assert lines[-1].startswith("RuntimeError: model broke on ")
        seen.add(lines[-1])
    assert seen == {f"RuntimeError: model broke on {i}" for i in range(n)}
    assert not [m for m in messages if m.startswith("Traceback")]
