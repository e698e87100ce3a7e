"""The supervisor around real children: exit codes, signals, pass-through, reaping."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import http.client
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from agent import supervisor
from tests.cloud import free_port
from tests.conftest import AGENT, agent_events, base_env, log_messages, run_agent, wait_for_stderr

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


ROOT = Path(__file__).parent.parent
SAMPLE_SERVER = str(ROOT / "examples" / "sample_server.py")


def ping(port: int) -> None:
    """GET /ping once: answered means the server's main thread is in serve_forever (its
    KeyboardInterrupt handling is in place), not just bound."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=20) as answer:  # noqa: S310
        assert answer.status == 200


class TestInitSignals:
    """The child runs in its own session, so a terminal's Ctrl-C reaches it once, via the agent."""

    @pytest.mark.parametrize("attempt", range(5))
    def test_sigint_to_the_whole_group_stops_sample_server_cleanly(
            self, env: dict[str, str], attempt: int) -> None:
        """SIGINT to the agent's process group (a terminal's Ctrl-C): server and agent exit 0,
        no traceback (the child gets one SIGINT, not one from the group and one forwarded)."""
        port = free_port()
        env["SAGEMAKER_BIND_TO_PORT"] = str(port)
        proc = start_agent([PY, SAMPLE_SERVER], env, start_new_session=True)
        seen = wait_for_stderr(proc, b"listening on")
        ping(port)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        stderr = seen + err
        assert proc.returncode == 0, stderr[-3000:]
        assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, [
            line for line in stderr.splitlines() if b"Traceback" in line]
        assert b"stopped" in stderr  # the server's own clean-exit line
        forwarded = [e for e in agent_events(stderr) if e["event"] == "signal_forwarded"]
        assert [e["signal"] for e in forwarded] == ["SIGINT"]

    def test_sigterm_lets_the_sample_servers_answer_in_flight_finish(
            self, env: dict[str, str]) -> None:
        """SIGTERM (how SageMaker stops a container) while an answer streams: the sample
        server finishes it whole, then stops cleanly (killed, it broke the answer off)."""
        port = free_port()
        env["SAGEMAKER_BIND_TO_PORT"] = str(port)
        proc = start_agent([PY, SAMPLE_SERVER], env)
        seen = wait_for_stderr(proc, b"listening on")
        ping(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/invocations?chunks=8&chunk_ms=100", body=b"")
        answer = conn.getresponse()
        assert answer.readline() == b"chunk 0\n"  # the answer is under way
        proc.send_signal(signal.SIGTERM)
        rest = answer.read()
        out, err = proc.communicate(timeout=30)
        stderr = seen + err
        assert rest == b"".join(b"chunk %d\n" % i for i in range(1, 8)), stderr[-3000:]
        assert proc.returncode == 0, stderr[-3000:]
        assert b"Traceback" not in stderr and b"stopped" in stderr
        forwarded = [e for e in agent_events(stderr) if e["event"] == "signal_forwarded"]
        assert [e["signal"] for e in forwarded] == ["SIGTERM"]

    def test_child_leads_its_own_session(self, env: dict[str, str]) -> None:
        """The child is a session and process-group leader, apart from the agent's group."""
        code = ("import os; print(os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid(), "
                "os.getpgrp() != os.getpgid(os.getppid()))")
        done = run_agent([PY, "-c", code], env)
        assert done.returncode == 0 and done.stdout == b"True True True\n", done.stderr

    def test_ctrl_c_on_a_terminal(self, env: dict[str, str]) -> None:
        """With a real terminal (a pty that is the agent's controlling terminal), Ctrl-C stops
        the sample server once and cleanly; the child still reads the terminal (no SIGTTIN)."""
        master, slave = pty.openpty()
        port = free_port()
        env["SAGEMAKER_BIND_TO_PORT"] = str(port)
        server = ("import sys, runpy\n"
                  "print('read from tty:', sys.stdin.readline().strip(), flush=True)\n"
                  f"sys.argv = [{SAMPLE_SERVER!r}]\n"
                  f"runpy.run_path({SAMPLE_SERVER!r}, run_name='__main__')\n")

        proc = subprocess.Popen([*AGENT, "run", "--", PY, "-c", server], env=env, stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=take_terminal)
        os.close(slave)
        try:
            os.write(master, b"hello-terminal\n")
            wait_for_line(proc, b"read from tty: hello-terminal")
            seen = wait_for_stderr(proc, b"listening on")
            ping(port)
            os.write(master, b"\x03")  # the line discipline sends SIGINT to the foreground group
            _, err = proc.communicate(timeout=30)
        finally:
            os.close(master)
        stderr = seen + err
        assert proc.returncode == 0, stderr[-3000:]
        assert b"Traceback" not in stderr
        forwarded = [e for e in agent_events(stderr) if e["event"] == "signal_forwarded"]
        assert [e["signal"] for e in forwarded] == ["SIGINT"]

    def test_ctrl_z_stops_child_and_agent_and_fg_resumes_both(self, env: dict[str, str]) -> None:
        """Ctrl-Z on the terminal stops the child too (its group is orphaned, so a plain
        SIGTSTP would be discarded); SIGCONT (what `fg` sends) resumes both."""
        master, slave = pty.openpty()
        child = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.05)\n"
        proc = subprocess.Popen([*AGENT, "run", "--", PY, "-c", child], env=env, stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=take_terminal)
        os.close(slave)
        child_pid = 0
        try:
            wait_for_line(proc, b"ready")
            seen = wait_for_stderr(proc, b"child_started")
            child_pid = next(e["pid"] for e in agent_events(seen) if e["event"] == "child_started")
            os.write(master, b"\x1a")  # Ctrl-Z: SIGTSTP to the foreground group (the agent)
            wait_for_state(child_pid, "T")
            wait_for_state(proc.pid, "T")
            os.killpg(proc.pid, signal.SIGCONT)
            wait_for_state(proc.pid, "RS")
            wait_for_state(child_pid, "RS")
            os.write(master, b"\x03")
            proc.communicate(timeout=30)
        finally:
            os.close(master)
            if proc.poll() is None:  # failed: leave nothing behind (the child has its own group)
                proc.kill()
                if child_pid:
                    os.killpg(child_pid, signal.SIGKILL)
        assert proc.returncode == 128 + signal.SIGINT  # the child's KeyboardInterrupt


def take_terminal() -> None:
    """Popen's preexec_fn, after setsid: the pty on stdin becomes the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def wait_for_state(pid: int, states: str, timeout: float = 10) -> None:
    """Until /proc says the process is in one of `states` (R running, S sleeping, T stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] in states:
                return
        time.sleep(0.01)
    raise AssertionError(f"{pid} never reached state {states}")



class TestStartup:
    def test_sigterm_while_starting_is_not_lost(self, tmp_path: Path) -> None:
        """A SIGTERM that arrives before the child runs is held and forwarded to it: the agent
        shuts down cleanly and promptly instead of dying half-started or running on."""
        imds = socket.socket()
        imds.bind(("127.0.0.1", 0))
        imds.listen()
        env = base_env(tmp_path, AWS_EC2_METADATA_DISABLED="false",
                       AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{imds.getsockname()[1]}")
        del env["TELEMETRY_HOST"]  # so the agent asks the (fake, silent) metadata service
        child = ("import signal, sys, time\n"
                 "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\ntime.sleep(60)\n")
        started = time.monotonic()
        proc = start_agent([PY, "-c", child], env)
        conn, _ = imds.accept()  # the agent is starting: it waits for the instance id
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        conn.close()
        imds.close()
        events = [e["event"] for e in agent_events(err)]
        # 143: the child died of the SIGTERM before its handler was set; 0: the handler ran.
        assert proc.returncode in (0, 128 + signal.SIGTERM), err[-2000:]
        assert "child_started" in events and events[-1] == "agent_stopped"
        assert time.monotonic() - started < 30  # not the child's 60 s

    def test_child_started_is_logged_before_child_exited(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A child that is gone by the time the agent looks still logs started, then exited."""
        real_popen = subprocess.Popen

        def popen_then_wait_for_exit(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            child = real_popen(*args, **kwargs)
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            return child

        monkeypatch.setattr(supervisor.subprocess, "Popen", popen_then_wait_for_exit)

        async def scenario() -> int:
            sup = supervisor.Supervisor(["true"], dict(os.environ), stop_grace=5)
            fds = sup.start()
            code = await sup.wait()
            for fd in fds:
                os.close(fd)
            return code

        with structlog.testing.capture_logs() as logs:
            assert asyncio.run(scenario()) == 0
        events = [e["event"] for e in logs]
        assert events.index("child_started") < events.index("child_exited"), events

    def test_script_without_shebang_is_126(self, env: dict[str, str], tmp_path: Path) -> None:
        """An executable file the kernel cannot run (ENOEXEC: no `#!`) exits 126 like a shell,
        with a log line and no traceback."""
        script = tmp_path / "script-without-shebang"
        script.write_text("echo hi\n")
        script.chmod(0o755)
        done = run_agent([str(script)], env)
        assert done.returncode == 126, done.stderr[-2000:]
        assert b"Traceback" not in done.stderr
        assert any(e["event"] == "child_not_executable" for e in agent_events(done.stderr))
        env["TELEMETRY_ENABLED"] = "false"  # the plain exec path too
        done = run_agent([str(script)], env)
        assert done.returncode == 126 and b"Traceback" not in done.stderr, done.stderr

    def test_hook_socket_directory_removed(self, env: dict[str, str], tmp_path: Path) -> None:
        """The private directory made for the hook socket is gone after the run."""
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        env["TMPDIR"] = str(tmp)
        code = "import os; print(os.path.exists(os.environ['TELEMETRY_HOOK_SOCKET']))"
        done = run_agent([PY, "-c", code], env)
        assert done.returncode == 0 and done.stdout == b"True\n", done.stderr
        assert list(tmp.iterdir()) == []

    def test_hook_socket_works_under_a_deep_tmpdir(self, env: dict[str, str],
                                                   tmp_path: Path) -> None:
        """A `TMPDIR` too deep for a Unix socket's path (sun_path holds 108 bytes): the
        socket goes to a private directory under /tmp instead of the hooks being switched
        off, and that directory is removed too. Before, hook_socket_unavailable."""
        tmp = tmp_path / ("d" * 60) / ("e" * 60)
        tmp.mkdir(parents=True)
        env["TMPDIR"] = str(tmp)
        code = ("import os, stat; p = os.environ['TELEMETRY_HOOK_SOCKET']; "
                "print(p, stat.S_ISSOCK(os.stat(p).st_mode), "
                "oct(os.stat(os.path.dirname(p)).st_mode & 0o777))")
        done = run_agent([PY, "-c", code], env)
        assert done.returncode == 0, done.stderr
        path, is_socket, mode = done.stdout.decode().split()
        assert is_socket == "True" and mode == "0o700" and len(path) < 108
        assert b"hook_socket_unavailable" not in done.stderr
        assert not Path(path).parent.exists() and list(tmp.iterdir()) == []
