"""Secure by default: loopback listeners, private sockets, no credential anywhere."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cloud import REGION, FaultProxy, free_port
from tests.conftest import AGENT, base_env
from tests.integration.conftest import RunningAgent, printer

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY-SECRET-1234"
TOKEN = "FwoGZXIvYXdzEXAMPLE-SESSION-TOKEN-5678"
pytestmark = pytest.mark.timeout(120)


@pytest.mark.xdist_group("fixed_ports")  # binds a fixed port: one worker runs these
def test_default_listeners_bind_loopback_and_the_hook_socket_is_private(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    for name in ("TELEMETRY_PROMETHEUS", "TELEMETRY_STATSD"):
        env.pop(name)  # the defaults: 127.0.0.1:9464 and 127.0.0.1:8125
    proc = subprocess.Popen([*AGENT, "run"], env=env, stderr=subprocess.PIPE)
    try:
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len([c for c in ps.net_connections("inet")
                                                    if c.status in ("LISTEN", "NONE")]) < 2:
            time.sleep(0.1)
        listening = {(c.laddr.ip, c.laddr.port) for c in ps.net_connections("inet")
                     if c.status in ("LISTEN", "NONE")}
        unix = [c.laddr for c in ps.net_connections("unix") if c.laddr]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert listening == {("127.0.0.1", 9464), ("127.0.0.1", 8125)}, listening
    assert len(unix) == 1 and unix[0].endswith("hooks.sock")


def test_no_credential_in_any_output_or_file(tmp_path: Path, proxy: FaultProxy) -> None:
    """Dry run, check-config, real delivery with rejected then accepted calls, the spool and
    the file sink: the secret key and session token appear nowhere."""
    secrets = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}
    spool = tmp_path / "spool"
    outputs: list[bytes] = []
    done = subprocess.run([*AGENT, "check-config"], env=base_env(tmp_path, **secrets),
                          capture_output=True, check=False)
    outputs += [done.stdout, done.stderr]
    proxy.faults.invalid_api = "PutLogEvents"
    proxy.faults.throttle_rate = 0.3
    env = base_env(tmp_path, **secrets, TELEMETRY_CLOUDWATCH="on", AWS_REGION=REGION,
                   AWS_ENDPOINT_URL=proxy.url, TELEMETRY_SPOOL_DIR=str(spool),
                   TELEMETRY_LOG_LEVEL="debug", TELEMETRY_INTERVAL="1",
                   TELEMETRY_PROMETHEUS=f"127.0.0.1:{free_port()}")
    code, out, err = RunningAgent(printer(3000), env).wait()
    outputs += [out, err]
    proxy.listen(False)  # leave something in the spool
    code, out, err = RunningAgent(printer(100), env | {"TELEMETRY_SHUTDOWN_TIMEOUT": "1"}).wait()
    outputs += [out, err]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".seg" for p in files) and any(p.name == "calls.jsonl" for p in files)
    outputs += [p.read_bytes() for p in files]
    for blob in outputs:
        assert SECRET.encode() not in blob and TOKEN.encode() not in blob
