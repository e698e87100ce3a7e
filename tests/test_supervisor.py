"""The supervisor around real children: exit codes, signals, pass-through, reaping."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import AGENT, agent_events, base_env, log_messages, run_agent

PY = sys.executable


def start_agent(cmd: list[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*AGENT, "run", "--", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


def wait_for_line(proc: subprocess.Popen[bytes], expected: bytes, timeout: float = 20) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if expected in line:
            return
        if not line:
            break
    raise AssertionError(f"{expected!r} never printed")


class TestExitStatus:
    @pytest.mark.parametrize(("code", "expected"), [(0, 0), (7, 7), (255, 255)])
    def test_exit_code_is_the_childs(self, env: dict[str, str], code: int, expected: int) -> None:
        """The agent exits with the child's exit code."""
        assert run_agent([PY, "-c", f"raise SystemExit({code})"], env).returncode == expected

    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGTERM])
    def test_death_by_signal_is_128_plus_n(self, env: dict[str, str], sig: int) -> None:
        """A child killed by signal N makes the agent exit 128+N."""
        done = run_agent([PY, "-c", f"import os; os.kill(os.getpid(), {int(sig)})"], env)
        assert done.returncode == 128 + sig

    def test_hi_then_7_with_file_sink(self, env: dict[str, str], tmp_path: Path) -> None:
        """The README's example: prints hi, exits 7, and 'hi' is in a PutLogEvents record."""
        done = run_agent([PY, "-c", "print('hi'); raise SystemExit(7)"], env)
        assert done.returncode == 7 and done.stdout == b"hi\n"
        records = [r for r in (tmp_path / "calls.jsonl").read_text().splitlines() if "PutLogEvents" in r]
        assert len(records) == 1
        assert '"logGroupName":"/aws/sagemaker/Endpoints/my-endpoint"' in records[0]
        assert '"logStreamName":"AllTraffic/i-0123456789abcdef0"' in records[0]
        assert '"message":"hi"' in records[0]

    def test_command_not_found_is_127(self, env: dict[str, str]) -> None:
        """A missing command exits 127, like a shell, with a clear log line."""
        done = run_agent(["/no/such/model-server"], env)
        assert done.returncode == 127
        assert any(e["event"] == "child_not_found" for e in agent_events(done.stderr))

    def test_disabled_is_a_plain_exec(self, env: dict[str, str], tmp_path: Path) -> None:
        """TELEMETRY_ENABLED=false execs the child: same pid, no agent output, no sink."""
        env["TELEMETRY_ENABLED"] = "false"
        proc = start_agent([PY, "-c", "import os; print(os.getpid())"], env)
        out, err = proc.communicate(timeout=30)
        assert int(out) == proc.pid and err == b"" and proc.returncode == 0
        assert not (tmp_path / "calls.jsonl").exists()

    def test_no_command_runs_until_sigterm(self, env: dict[str, str]) -> None:
        """`run` without CMD runs the agent alone until SIGTERM, then exits 0."""
        proc = subprocess.Popen([*AGENT, "run"], env=env, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        for line in proc.stderr:
            if b"agent_started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


class TestSignals:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT])
    def test_signal_forwarded_and_handler_runs(self, env: dict[str, str], sig: int) -> None:
        """Signals sent to the agent reach the child, whose own handler runs."""
        child = (f"import signal, sys, time\n"
                 f"def h(n, f):\n    print('handled', n, flush=True); sys.exit(0)\n"
                 f"signal.signal({int(sig)}, h)\nprint('ready', flush=True)\ntime.sleep(30)\n")
        proc = start_agent([PY, "-c", child], env)
        wait_for_line(proc, b"ready")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
        assert f"handled {int(sig)}".encode() in out
        assert proc.returncode == 0

    def test_child_ignoring_sigterm_is_killed_after_grace(self, env: dict[str, str]) -> None:
        """A child that ignores SIGTERM gets SIGKILL after TELEMETRY_STOP_GRACE."""
        env["TELEMETRY_STOP_GRACE"] = "1"
        child = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "print('ready', flush=True)\ntime.sleep(60)\n")
        proc = start_agent([PY, "-c", child], env)
        wait_for_line(proc, b"ready")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGKILL
        assert time.monotonic() - started < 15
        assert any(e["event"] == "child_killed" for e in agent_events(err))


class TestPassThrough:
    def test_byte_exact_including_invalid_utf8(self, env: dict[str, str], tmp_path: Path) -> None:
        """stdout and stderr pass through byte for byte; the sink gets U+FFFD instead."""
        payload = b"plain\n\xff\xfe bad utf8\r\nno newline at end \x00 nul"
        env["TELEMETRY_LOG_LEVEL"] = "error"  # keep the agent quiet on stderr
        code = (f"import os; os.write(1, {payload!r}); os.write(2, {payload[::-1]!r})")
        done = run_agent([PY, "-c", code], env)
        assert done.returncode == 0
        assert done.stdout == payload
        assert done.stderr == payload[::-1]
        messages = log_messages(tmp_path / "calls.jsonl")
        assert "\ufffd\ufffd bad utf8" in messages
        assert "no newline at end \x00 nul" in messages  # the last partial line is an event too

    def test_stalled_sink_never_slows_the_child(self, tmp_path: Path) -> None:
        """200 MB through the agent while its file sink blocks forever: output exact, drops counted."""
        fifo = tmp_path / "stalled.fifo"
        os.mkfifo(fifo)  # opening it for writing blocks: nobody ever reads it
        env = base_env(tmp_path, TELEMETRY_FILE_SINK=str(fifo), TELEMETRY_BUFFER_MB="8",
                       TELEMETRY_SHUTDOWN_TIMEOUT="2")
        child = ("import os, hashlib\nline = (b'x' * 99 + b'\\n') * 10486\n"
                 "h = hashlib.sha256()\n"
                 "for i in range(200):\n    os.write(1, line); h.update(line)\n"
                 "os.write(2, h.hexdigest().encode())\n")
        out_path = tmp_path / "out.bin"
        with out_path.open("wb") as out:
            started = time.monotonic()
            done = subprocess.run([*AGENT, "run", "--", PY, "-c", child], env=env, stdout=out,
                                  stderr=subprocess.PIPE, timeout=180, check=False)
            elapsed = time.monotonic() - started
        assert done.returncode == 0
        digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
        assert out_path.stat().st_size == 200 * 10486 * 100
        assert digest.encode() in done.stderr
        events = agent_events(done.stderr)
        stopped = next(e for e in events if e["event"] == "agent_stopped")
        # The file sink never wrote a record; it dropped the oldest and said so.
        assert stopped["file_records_written"] == 0 and stopped["file_records_dropped"] > 0
        assert stopped["level"] == "warning"
        assert stopped["child_output_bytes"] == 200 * 10486 * 100 + 64  # + the digest on stderr
        assert elapsed < 120


class TestReaping:
    @pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
    def test_orphans_reaped_as_pid1(self, env: dict[str, str]) -> None:
        """As PID 1 in a new PID namespace the agent reaps orphaned zombies."""
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                               capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot create a PID namespace here: {probe.stderr!r}")
        child = (
            "import os, time\n"
            "for _ in range(5):\n"
            "    if os.fork() == 0:\n"           # middle process
            "        if os.fork() == 0:\n"       # grandchild: orphaned, exits later
            "            time.sleep(0.3); os._exit(0)\n"
            "        os._exit(0)\n"
            "    os.wait()\n"
            "time.sleep(1.5)\n"
            "zombies = 0\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        stat = open(f'/proc/{pid}/stat').read()\n"
            "    except OSError:\n"
            "        continue\n"
            "    zombies += stat.rsplit(')', 1)[1].split()[0] == 'Z'\n"
            "print('zombies', zombies, 'pid1', open('/proc/1/cmdline').read().split(chr(0))[1])\n"
        )
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", *AGENT, "run", "--",
                               PY, "-c", child], env=env, capture_output=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert b"zombies 0 pid1 -m" in done.stdout
