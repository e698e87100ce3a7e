"""Every example runs as documented: the README's quick start, the ASGI hooks example and the
nginx → gunicorn → Flask layout, each a real process tree under the real agent, with real HTTP
requests; the figures are read back from the PutMetricData calls in the file sink.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cloud import free_port
from tests.conftest import AGENT, base_env, read_calls
from tests.integration.test_requests import VARIANT, invocation_datums

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parent.parent.parent


def readme_block(heading: str, index: int) -> str:
    """The `index`-th ```sh block under a README heading."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.DOTALL)[index]


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def wait_for_ping(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until GET /ping answers 200 (the agent and its child are up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate(timeout=30)
            raise AssertionError(f"/ping never answered 200: {out[-2000:]!r} {err[-2000:]!r}")
        time.sleep(0.05)


def invoke(port: int, count: int, body: bytes = b"[[1, 2, 3]]") -> list[tuple[int, Any]]:
    """`count` POST /invocations on one keep-alive connection: (status, JSON answer) each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    answers = []
    for _ in range(count):
        conn.request("POST", "/invocations", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answers.append((response.status, json.loads(response.read() or b"null")))
    conn.close()
    return answers


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[str, str]:
    """Signal the process (its whole group for SIGINT, as a terminal's Ctrl-C) and wait."""
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return out.decode(errors="replace"), err.decode(errors="replace")


def problems(output: str) -> list[str]:
    """Lines a newcomer would read as something gone wrong."""
    bad = re.compile(r'Traceback|"level": ?"(error|critical)"|Error:|^\s*(ERROR|CRITICAL)\b|'
                     r"\[(error|critical|crit|alert|emerg)\s*\]", re.IGNORECASE)
    return [line for line in output.splitlines() if bad.search(line)]


# -- (a) the README's quick start, as written ---------------------------------------------------


def blocker(tmp_path: Path, *packages: str) -> Path:
    """A directory that, first on PYTHONPATH, makes importing each package fail as if it were
    not installed."""
    folder = tmp_path / "not-installed"
    for name in packages:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed by pip install .')\n")
    return folder


@pytest.mark.parametrize("metadata", ["disabled", "unset"])
def test_readme_quick_start_as_written(tmp_path: Path, metadata: str) -> None:
    """The quick start's commands from the README, minus `pip install`, give no error and no
    traceback, with AWS_EC2_METADATA_DISABLED set and without it; the file sink holds what the
    README says it holds."""
    setup = commands(readme_block("Quick start", 0))
    assert setup[0].startswith("python3 -m pip install"), setup
    run = setup[1]
    calls = tmp_path / "calls.jsonl"
    front, upstream = free_port(), free_port()
    # The README's fixed ports and file, moved aside so the test shares the machine safely.
    run = (run.replace("/tmp/calls.jsonl", str(calls))
           .replace("127.0.0.1:8080", f"127.0.0.1:{front}")
           .replace("127.0.0.1:8081", f"127.0.0.1:{upstream}"))
    assert "telemetry-agent run --" in run and str(calls) in run, run
    # A newcomer's shell: no TELEMETRY_* settings, no credentials (~/.aws kept out of reach).
    env = {k: v for k, v in base_env(tmp_path).items()
           if not k.startswith("TELEMETRY_")
           and k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update({
        # the defaults' listeners, on free ports (another process may hold 9464/8125)
        "TELEMETRY_PROMETHEUS": f"127.0.0.1:{free_port()}",
        "TELEMETRY_STATSD": f"127.0.0.1:{free_port()}",
        # the console script, wherever this interpreter keeps it
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # `pip install .` alone: packages that come with the test extras are out of reach
        "PYTHONPATH": f"{blocker(tmp_path, 'numpy', 'flask', 'uvicorn')}{os.pathsep}{ROOT}",
    })
    if metadata == "unset":
        env.pop("AWS_EC2_METADATA_DISABLED")
        # Never a real metadata service: a closed local port answers as a laptop's network does.
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(["bash", "-c", run], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_ping(front, proc)
        tries = commands(readme_block("Quick start", 1))
        assert [c.split()[0] for c in tries] == ["curl", "curl"], tries
        answers = [subprocess.run(shlex.split(c.replace("localhost:8080", f"127.0.0.1:{front}")),
                                  capture_output=True, timeout=10, check=True).stdout
                   for c in tries]
    finally:
        out, err = stop(proc, signal.SIGINT)  # Ctrl-C in the terminal
    output = out + err
    assert json.loads(answers[1])["predictions"] == pytest.approx([1.5], abs=0.01), answers
    assert proc.returncode == 0, output[-3000:]
    assert problems(output) == [], output[-3000:]
    apis = [record["api"] for record in read_calls(calls)]
    assert {"CreateLogGroup", "CreateLogStream", "PutLogEvents", "PutMetricData"} <= set(apis)
    group = next(r["params"] for r in read_calls(calls) if r["api"] == "CreateLogGroup")
    assert group["logGroupName"] == "/aws/sagemaker/Endpoints/demo"
    # No metadata service answered (disabled, or the closed port): the host is the hostname.
    stream = next(r["params"] for r in read_calls(calls) if r["api"] == "CreateLogStream")
    assert stream["logStreamName"] == f"AllTraffic/{socket.gethostname()}"
    assert invocation_datums(calls)[("Invocations", VARIANT)]["sum"] == 1


# -- (b) hooks in a plain ASGI app under uvicorn ---------------------------------------------------


def example_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = base_env(tmp_path, TELEMETRY_INTERVAL="5", **extra)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_asgi_hooks_example_counts_every_request(tmp_path: Path) -> None:
    """examples/asgi_app.py under `telemetry-agent run -- uvicorn ...`: N requests, N Invocations
    and N ModelLatency values, no proxy."""
    port, requests = free_port(), 40
    proc = subprocess.Popen(
        [*AGENT, "run", "--", sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
         "--port", str(port)],
        cwd=ROOT, env=example_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        wait_for_ping(port, proc)
        answers = invoke(port, requests)
        bad = invoke(port, 3, b"not json")
    finally:
        out, err = stop(proc)
    assert [status for status, _ in answers] == [200] * requests, err[-2000:]
    assert answers[0][1]["predictions"] == pytest.approx([1.5], abs=0.01)
    assert [status for status, _ in bad] == [400] * 3
    # uvicorn ends by re-raising the signal it stopped on: the agent reports it as 128 + 15
    assert proc.returncode in (0, 128 + signal.SIGTERM), err[-3000:]
    assert problems(out + err) == [], err[-3000:]
    datums = invocation_datums(tmp_path / "calls.jsonl")
    assert datums[("Invocations", VARIANT)]["sum"] == requests + 3
    assert datums[("Invocation4XXErrors", VARIANT)]["sum"] == 3
    assert datums[("ModelLatency", VARIANT)]["count"] == requests + 3


# -- (c) nginx → gunicorn → Flask, SageMaker's bring-your-own-container layout ----------------


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="nginx is installed by .ci/run (nginx-light)")
@pytest.mark.parametrize("front", ["hooks", "proxy"])
def test_byoc_nginx_gunicorn_flask_counts_every_request(tmp_path: Path, front: str) -> None:
    """examples/byoc/serve under the agent: nginx on SageMaker's port, gunicorn workers behind it
    on a Unix socket, the Flask app wrapped in the hooks. N requests, N Invocations, whether the
    hooks count them or the agent's proxy in front of nginx does (the hooks then stand down)."""
    port, requests = free_port(), 30
    # A short path of our own: Unix socket paths are limited to 107 bytes, and nginx's
    # workers (another user when run as root) must reach it.
    socket_path = f"/tmp/byoc-{os.getpid()}-{port}.sock"
    extra = {"SAGEMAKER_BIND_TO_PORT": str(port), "MODEL_SERVER_SOCKET": socket_path,
             "MODEL_SERVER_WORKERS": "2"}
    if front == "proxy":  # the agent takes the port; nginx moves to the upstream's
        extra.pop("SAGEMAKER_BIND_TO_PORT")
        extra.update(TELEMETRY_PROXY_LISTEN=f"127.0.0.1:{port}",
                     TELEMETRY_PROXY_UPSTREAM=f"127.0.0.1:{free_port()}")
    proc = subprocess.Popen([*AGENT, "run", "--", str(ROOT / "examples" / "byoc" / "serve")],
                            cwd=ROOT, env=example_env(tmp_path, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for_ping(port, proc)
        answers = invoke(port, requests)
        bad = invoke(port, 2, b"[1, 2, 3]")
    finally:
        out, err = stop(proc)
    assert [status for status, _ in answers] == [200] * requests, err[-2000:]
    assert answers[-1][1]["predictions"] == pytest.approx([1.5], abs=0.01)
    assert [status for status, _ in bad] == [400] * 2
    assert proc.returncode == 0, err[-3000:]
    assert problems(out + err) == [], err[-3000:]
    assert not Path(socket_path).exists()  # gunicorn cleaned up after itself
    datums = invocation_datums(tmp_path / "calls.jsonl")
    assert datums[("Invocations", VARIANT)]["sum"] == requests + 2, err[-3000:]
    assert datums[("Invocation4XXErrors", VARIANT)]["sum"] == 2
    # nginx's access log and gunicorn's own lines reach CloudWatch Logs through the agent
    messages = [e["message"] for r in read_calls(tmp_path / "calls.jsonl")
                if r["api"] == "PutLogEvents" for e in r["params"]["logEvents"]]
    assert sum('"POST /invocations HTTP/1.1" 200' in m for m in messages) == requests
    assert any("Booting worker" in m for m in messages)
