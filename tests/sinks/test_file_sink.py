"""The file sink's memory bound: a writer that cannot keep up costs counted drops, not RSS.

Real agent, real child flooding its stdout with 10 MB lines, and the file sink pointed at
a FIFO nobody reads (the worst slow file: the writer blocks for good), so every record
the agent renders must wait or be dropped. Without a bound by bytes the queue held up to
10,000 records of about 1 MB each (367 MB RSS seen; 600+ MB here).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.sinks.file import FileSink
from tests.conftest import AGENT, agent_events, base_env

pytestmark = pytest.mark.timeout(120)


def peak_rss_mib(pid: int) -> float:
    """The process's RSS high-water mark (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_blocked_file_sink_keeps_memory_bounded_under_10mb_lines(tmp_path: Path) -> None:
    """3 s of 10 MB lines into an agent whose file sink cannot write: the agent's peak RSS
    stays near its own bounds (memory buffer 8 MiB + file sink 16 MiB), and the records
    it could not hold are counted as dropped in `agent_stopped`."""
    fifo = tmp_path / "calls.fifo"
    os.mkfifo(fifo)
    flooded = tmp_path / "flooded"
    child = tmp_path / "child.py"
    child.write_text(
        "import sys, time\n"
        "line = b'x' * (10 << 20) + b'\\n'\n"
        "end = time.monotonic() + 3\n"
        "while time.monotonic() < end:\n"
        "    sys.stdout.buffer.write(line)\n"
        "sys.stdout.flush()\n"
        f"open({str(flooded)!r}, 'w').close()\n"
        "time.sleep(60)\n")
    env = base_env(tmp_path, TELEMETRY_FILE_SINK=str(fifo), TELEMETRY_BUFFER_MB="8",
                   TELEMETRY_SHUTDOWN_TIMEOUT="2")
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([*AGENT, "run", "--", sys.executable, str(child)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 60
            while not flooded.exists():  # the child's own signal that the flood is over
                assert proc.poll() is None and time.monotonic() < deadline, err.read_bytes()[-2000:]
                time.sleep(0.05)
            peak = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    stopped = next(e for e in agent_events(err.read_bytes()) if e["event"] == "agent_stopped")
    assert stopped["file_records_dropped"] > 0, stopped
    assert peak < 160, f"peak RSS {peak:.0f} MiB"


def test_record_over_the_byte_bound_is_dropped_and_counted(tmp_path: Path) -> None:
    """A record larger than the whole bound is dropped at once (never held), and queued
    ones beyond the bound push the oldest out; each drop is counted."""
    fifo = tmp_path / "blocked.fifo"
    os.mkfifo(fifo)  # nobody opens it: the writer blocks, every record stays queued
    sink = FileSink(fifo, max_bytes=4096)
    sink.record("PutLogEvents", {"logEvents": [{"message": "x" * 5000}]})
    assert sink.dropped == 1
    for n in range(10):
        sink.record("PutMetricData", {"n": n, "pad": "y" * 900})
    assert sink.dropped == 1 + 10 - 4  # four records of about 1 KB fit in 4 KiB
    assert sink.counters() == {"records_written": 0, "records_dropped": 7}
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # now the writer can open and write
    try:
        asyncio.run(sink.aclose(10))
        assert sink.counters() == {"records_written": 4, "records_dropped": 7}
        assert os.read(reader, 65536).count(b"PutMetricData") == 4
    finally:
        os.close(reader)
