"""The example image end to end, without Docker: its ENTRYPOINT + CMD run exactly as the
Dockerfile states them (same arguments, same ENV, `serve` on PATH, WORKDIR's files), driven as
SageMaker would drive it, with moto as CloudWatch; then the metrics and logs that arrived are read
back from moto."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.cloud import REGION, MotoServer, free_port
from tests.conftest import AGENT, base_env
from tests.integration.conftest import stored_messages

ROOT = Path(__file__).parent.parent.parent
pytestmark = pytest.mark.timeout(120)


def dockerfile() -> tuple[list[str], dict[str, str], str]:
    """(ENTRYPOINT + CMD, ENV, USER) as the Dockerfile states them."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    user = re.search(r"^USER (\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    return entry + cmd, env, user


def wait_until_free(port: int, seconds: float = 15.0) -> None:
    """Until no process listens on the port. SO_REUSEADDR as the model server binds, so
    the last run's connections in TIME_WAIT do not count as taken."""
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"port {port} stays taken by another process") from None
        time.sleep(0.2)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    _, _, user = dockerfile()
    assert user not in ("root", "0")
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text()


@pytest.mark.xdist_group("fixed_ports")  # binds a fixed port: one worker runs these
def test_image_entrypoint_serves_and_ships_metrics_and_logs(tmp_path: Path, moto: MotoServer) -> None:
    moto.reset()
    argv, image_env, _ = dockerfile()
    assert argv == ["telemetry-agent", "run", "--", "serve"]
    bin_dir = tmp_path / "bin"  # the image installs examples/serve as /usr/local/bin/serve
    bin_dir.mkdir()
    shutil.copy(ROOT / "examples" / "serve", bin_dir / "serve")
    (bin_dir / "serve").chmod(0o755)
    port = free_port()
    env = base_env(tmp_path, **image_env)
    env.pop("TELEMETRY_FILE_SINK")
    env.update({  # what SageMaker and the operator add
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "SAGEMAKER_BIND_TO_PORT": str(port), "TELEMETRY_ENDPOINT_NAME": "demo-endpoint",
        "TELEMETRY_CONTAINER_NAME": "model", "AWS_REGION": REGION, "AWS_ENDPOINT_URL": moto.url,
        "TELEMETRY_PROMETHEUS": f"127.0.0.1:{free_port()}", "TELEMETRY_STATSD": "off",
    })
    upstream = int(image_env["TELEMETRY_PROXY_UPSTREAM"].rpartition(":")[2])
    wait_until_free(upstream)  # the image's fixed model port; a lingering server would answer
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        # Ready when /ping answers 200 (until the model server is up the proxy answers 502).
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "/ping never answered 200"
            time.sleep(0.1)
        predictions = []
        for i in range(25):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/invocations", body=json.dumps([[1, 2, 3], [i, 0, 0]]),
                         headers={"Content-Type": "application/json"})
            answer = conn.getresponse()
            assert answer.status == 200
            predictions.append(json.loads(answer.read())["predictions"])
        conn.request("POST", "/invocations", body=b"not json")
        refused = conn.getresponse()
        assert refused.status == 400
        # Read it whole: the server writes head and body apart, and the proxy counts the
        # answer once it went out whole (one the model breaks off mid-way is its 502).
        assert json.loads(refused.read())["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 143), err[-2000:]
    # The model is real: 3·1 − 2·2 + 0.5·3 + 1 = 1.5 and 3·i + 1.
    assert predictions[0][0] == pytest.approx(1.5, abs=0.01)
    assert predictions[10][1] == pytest.approx(31.0, abs=0.05)

    cloudwatch = moto.client("cloudwatch")
    now = dt.datetime.now(dt.UTC)
    dims = [{"Name": "EndpointName", "Value": "demo-endpoint"},
            {"Name": "VariantName", "Value": "AllTraffic"}]

    def total(metric: str, dimensions: list[dict[str, str]]) -> float:
        points = cloudwatch.get_metric_statistics(
            Namespace="SageMakerAgent", MetricName=metric, Dimensions=dimensions,
            StartTime=now - dt.timedelta(minutes=5), EndTime=now + dt.timedelta(minutes=2),
            Period=60, Statistics=["Sum", "SampleCount"])["Datapoints"]
        return sum(p["Sum"] for p in points)

    container = [*dims, {"Name": "ContainerName", "Value": "model"}]
    # moto matches dimensions as a subset (CloudWatch matches exactly), so query the fuller set.
    assert total("Invocations", container) == 26, err[-3000:]
    assert total("Invocation4XXErrors", container) == 1
    assert total("ContainerLatency", container) > 0
    series = cloudwatch.list_metrics(Namespace="SageMakerAgent", MetricName="Invocations")
    # (moto lists a series once per interval it got; the run may straddle a minute)
    assert {tuple(sorted(d["Name"] for d in m["Dimensions"])) for m in series["Metrics"]} == {
        ("ContainerName", "EndpointName", "VariantName"), ("EndpointName", "VariantName")}
    instance = cloudwatch.list_metrics(Namespace="SageMakerAgent/Endpoints")["Metrics"]
    assert {m["MetricName"] for m in instance} >= {"CPUUtilization", "MemoryUtilization"}
    messages = stored_messages(moto, "/aws/sagemaker/Endpoints/demo-endpoint",
                               f"AllTraffic/{env['TELEMETRY_HOST']}/model")
    assert sum("predicted rows=2" in m for m in messages) == 25, (messages[-5:], err[-3000:])
    assert b"predicted rows=2" in err  # and the server's own output still reaches stderr


def test_dashboard_command_is_accepted_by_cloudwatch(tmp_path: Path, moto: MotoServer) -> None:
    """`telemetry-agent dashboard` prints a body PutDashboard accepts, with the published names."""
    env = base_env(tmp_path, TELEMETRY_CONTAINER_NAME="model", AWS_REGION=REGION)
    done = subprocess.run([*AGENT, "dashboard"], env=env, capture_output=True, check=True)
    body = json.loads(done.stdout)
    metrics = [m for w in body["widgets"] for m in w["properties"]["metrics"]]
    names = {m[1] for m in metrics if isinstance(m[0], str)}
    assert names >= {"Invocations", "Invocation5XXErrors", "ModelLatency", "ContainerLatency",
                     "OverheadLatency", "CPUUtilization", "GPUUtilization"}
    assert ["SageMakerAgent", "ModelLatency", "EndpointName", "my-endpoint", "VariantName",
            "AllTraffic", {"stat": "p99"}] in metrics
    answer = moto.client("cloudwatch").put_dashboard(DashboardName="agent",
                                                     DashboardBody=done.stdout.decode())
    assert answer["DashboardValidationMessages"] == []
