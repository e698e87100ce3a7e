"""The in-process hooks: light to import, never raising, never blocking, never losing a
request to a burst (they tally in process and send compact datagrams)."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import hooks
from agent.model import RequestRecord
from agent.rules.statsd import invocation_record, split_datagram
from tests.conftest import AGENT, agent_events, base_env

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _nothing_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends with an empty tally (no path: a flush discards it)."""
    monkeypatch.delenv("TELEMETRY_HOOK_SOCKET", raising=False)
    hooks.flush()
    yield
    monkeypatch.delenv("TELEMETRY_HOOK_SOCKET", raising=False)
    hooks.flush()


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    return server


def drain(server: socket.socket) -> list[RequestRecord]:
    """Every request waiting on the test's socket."""
    records: list[RequestRecord] = []
    server.setblocking(False)
    while True:
        try:
            data = server.recv(1 << 20)
        except BlockingIOError:
            return records
        records += parse(data)


def parse(data: bytes) -> list[RequestRecord]:
    """A hook datagram as the agent reads it: compact lines, and single requests in the
    classic one-value form."""
    samples, records, bad = split_datagram(data)
    assert not bad, data[:200]
    singles = [invocation_record(s) for s in samples]
    assert all(r is not None for r in singles), data[:200]
    return records + singles  # type: ignore[operator]


def keyed(records: list[RequestRecord]) -> Counter[tuple[int, int, int | None]]:
    return Counter((r.status, round(r.model_us),
                    None if r.container_us is None else round(r.container_us)) for r in records)


def test_import_pulls_in_nothing_heavy() -> None:
    code = ("import sys, agent.hooks\n"
            "heavy = {'boto3', 'botocore', 'psutil', 'structlog', 'prometheus_client', 'httptools',"
            " 'agent.app', 'agent.config'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_agent_means_dropped_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    before = hooks.dropped()
    assert hooks.record(status=200, model_s=0.01) is True  # queued: the sender finds no agent
    with hooks.inference():
        pass
    assert hooks.record(status="not a status", model_s=0.01) is False  # type: ignore[arg-type]
    assert hooks.record(status=200, model_s=float("nan")) is True  # found out by the sender
    hooks.flush()
    assert hooks.dropped() == before + 4


def test_datagrams_parse_back_to_the_request(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    server = listen(tmp_path / "agent.sock")
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(tmp_path / "agent.sock"))
    assert hooks.record(status=503, model_s=0.0125, container_s=0.02)

    @hooks.inference
    def predict(x: int) -> int:
        return x * 2

    assert predict(21) == 42
    assert hooks.flush()
    records = drain(server)
    assert len(records) == 2
    first = next(r for r in records if r.status == 503)
    second = next(r for r in records if r.status == 200)
    assert first.model_us == pytest.approx(12_500) and first.container_us == pytest.approx(20_000)
    assert second.container_us is None and 0 <= second.model_us < 1e6
    server.close()


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(
    st.tuples(st.sampled_from([200, 201, 404, 500, 503]), st.integers(0, 10**9),
              st.none() | st.integers(0, 10**9)),
    st.integers(1, 10**5), max_size=200), st.integers(200, 4000))
def test_the_wire_format_round_trips_exactly(tally: dict[tuple[int, int, int | None], int],
                                             limit: int) -> None:
    """Whatever the tally, it leaves as datagrams within the size limit that the agent's
    parser turns back into exactly the same requests, each key in exactly one datagram."""
    received: list[RequestRecord] = []
    sent_keys: list[tuple[int, int, int | None]] = []
    for data, keys, count in hooks._datagrams(list(tally.items()), limit):
        assert len(data) <= limit
        records = parse(data)
        assert len(records) == count == sum(tally[k] for k in keys)
        received += records
        sent_keys += keys
    assert sorted(sent_keys, key=repr) == sorted(tally, key=repr)
    assert keyed(received) == Counter(tally)


def test_a_burst_from_four_threads_loses_nothing(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """200,000 requests from 4 threads at full speed, to a socket nobody reads until they
    are done, then read slowly (the kernel queues 10 datagrams): no call blocks (the
    threads finish while the socket is full, however busy the machine), every request
    arrives with its exact latencies."""
    path = tmp_path / "slow.sock"
    server = listen(path)
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(path))
    before = hooks.dropped()
    received: list[RequestRecord] = []
    done = threading.Event()

    def slow_reader() -> None:
        senders_done.wait()  # a stalled agent: any call that waited on the socket hangs
        server.settimeout(0.05)
        while not done.is_set():
            try:
                data = server.recv(1 << 20)
            except TimeoutError:
                continue
            received.extend(parse(data))
            time.sleep(0.02)  # a busy agent

    def sender(index: int) -> None:
        for i in range(50_000):
            micros = 1000 + (i * 7 + index) % 30_000
            hooks.record(status=200 if i % 100 else 500, model_s=micros / 1e6,
                         container_s=(micros + 250) / 1e6 if i % 2 else None)

    senders_done = threading.Event()
    reader = threading.Thread(target=slow_reader)
    reader.start()
    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    blocked = [thread for thread in threads if thread.is_alive()]
    senders_done.set()
    assert not blocked, "a hook call waited on the full socket"
    assert hooks.flush(timeout=30.0)
    time.sleep(0.2)
    done.set()
    reader.join()
    received += drain(server)
    server.close()
    expected = Counter()
    for index in range(4):
        for i in range(50_000):
            micros = 1000 + (i * 7 + index) % 30_000
            expected[(200 if i % 100 else 500, micros, micros + 250 if i % 2 else None)] += 1
    assert len(received) == 200_000
    assert keyed(received) == expected
    assert hooks.dropped() == before


def test_async_inference_stays_a_coroutine_function(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    server = listen(tmp_path / "agent.sock")
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(tmp_path / "agent.sock"))

    @hooks.inference
    async def predict(x: int) -> int:
        await asyncio.sleep(0.01)
        return x + 1

    class Model:
        @hooks.inference()
        async def predict(self, x: int) -> int:
            return x - 1

    assert inspect.iscoroutinefunction(predict)
    assert inspect.iscoroutinefunction(Model().predict)
    assert predict.__name__ == "predict"
    assert asyncio.run(predict(1)) == 2 and asyncio.run(Model().predict(1)) == 0
    hooks.flush()
    records = drain(server)
    assert len(records) == 2 and max(r.model_us for r in records) >= 10_000
    server.close()


def test_reconnects_after_the_agent_restarts(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """Requests recorded while the agent restarts are held and reach the new one."""
    path = tmp_path / "agent.sock"
    monkeypatch.setenv("TELEMETRY_HOOK_SOCKET", str(path))
    first = listen(path)
    assert hooks.record(status=200, model_s=0.001)
    assert hooks.flush()
    assert len(drain(first)) == 1
    first.close()
    path.unlink()
    for _ in range(3):
        hooks.record(status=200, model_s=0.002)
    assert not hooks.flush()  # nobody there: held
    second = listen(path)  # a new agent on the same path
    for _ in range(3):
        if hooks.flush():
            break
    records = drain(second)
    assert len(records) == 3 and {r.model_us for r in records} == {2000.0}
    second.close()


def test_hook_socket_is_private(tmp_path: Path) -> None:
    """The socket the agent makes is 0600 in a 0700 directory."""
    from agent.sources.statsd import DatagramIntake, listen_unix

    async def make() -> None:
        transport = await listen_unix(DatagramIntake(lambda _: None), tmp_path / "d" / "h.sock")
        transport.close()

    path = tmp_path / "d" / "h.sock"
    asyncio.run(make())
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_uid == os.getuid()


def test_shutdown_drains_what_waits_in_the_hook_socket(tmp_path: Path) -> None:
    """Datagrams queued when the agent stops (a child's exit flush) are read, not lost."""
    from agent.sources.statsd import DatagramIntake, drain, listen_unix

    got: list[RequestRecord] = []

    async def run() -> int:
        intake = DatagramIntake(lambda _: None, got.extend)
        transport = await listen_unix(intake, tmp_path / "h.sock")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for _ in range(5):  # no await in between: the loop has not read any of them
            client.sendto(b"sagemaker.invocation:1*10:2/3|ms|#status:200", str(tmp_path / "h.sock"))
        client.close()
        count = drain(transport)
        transport.close()
        return count

    assert asyncio.run(run()) == 5
    assert len(got) == 55


# -- in a process of their own: exit, fork, lifespan --------------------------------------

QUIET = """
import os, sys
from agent import hooks
hooks.FLUSH_INTERVAL_S = 3600  # nothing leaves on the sender's clock in this test
os.environ["TELEMETRY_HOOK_SOCKET"] = sys.argv[1]
"""


def run_script(tmp_path: Path, body: str) -> tuple[list[RequestRecord], str]:
    path = tmp_path / "agent.sock"
    server = listen(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", QUIET + textwrap.dedent(body), str(path)],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    records = drain(server)
    server.close()
    return records, done.stdout


def test_a_process_that_exits_flushes_what_it_holds(tmp_path: Path) -> None:
    records, _ = run_script(tmp_path, """
        for i in range(300):
            hooks.record(status=200, model_s=0.005, container_s=0.006)
        """)
    assert keyed(records) == {(200, 5000, 6000): 300}


def test_a_forked_worker_sends_its_own_requests_only(tmp_path: Path) -> None:
    records, _ = run_script(tmp_path, """
        for i in range(100):
            hooks.record(status=200, model_s=0.001)  # held by the parent at fork time
        pid = os.fork()
        if pid == 0:
            for i in range(7):
                hooks.record(status=201, model_s=0.002)
            sys.exit(0)  # the worker's exit flushes its 7, not the parent's 100
        os.waitpid(pid, 0)
        """)
    assert keyed(records) == {(200, 1000, None): 100, (201, 2000, None): 7}


def test_asgi_lifespan_shutdown_flushes(tmp_path: Path) -> None:
    records, out = run_script(tmp_path, """
        import asyncio, socket
        async def app(scope, receive, send):
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        wrapped = hooks.ASGIMiddleware(app)
        for i in range(20):
            hooks.record(status=200, model_s=0.003)
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        async def receive():
            return next(messages)
        async def send(message):
            pass
        asyncio.run(wrapped({"type": "lifespan"}, receive, send))
        print("shut down", flush=True)
        os._exit(0)  # no atexit: only the shutdown event can have sent them
        """)
    assert out.strip() == "shut down"
    assert keyed(records) == {(200, 3000, None): 20}


def test_a_burst_reaches_the_real_agent_and_exit_flushes(tmp_path: Path) -> None:
    """A child of the real agent records 200,000 requests from 4 threads as fast as it can
    and exits at once: the agent counts every one."""
    child = tmp_path / "burst.py"
    child.write_text(textwrap.dedent("""
        import threading
        from agent import hooks
        def burst(index):
            for i in range(50_000):
                hooks.record(status=200, model_s=(1000 + (i + index) % 5000) / 1e6,
                             container_s=(2000 + i % 7000) / 1e6)
        threads = [threading.Thread(target=burst, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("dropped", hooks.dropped(), flush=True)
        """))
    env = base_env(tmp_path)
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([*AGENT, "run", "--", sys.executable, str(child)], env=env,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"dropped 0" in done.stdout
    stopped = next(e for e in agent_events(done.stderr) if e["event"] == "agent_stopped")
    assert stopped["requests"] == 200_000
    assert stopped["datagram_lines_malformed"] == 0
