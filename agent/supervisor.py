"""Runs the model server as the agent's child: spawn, forward signals, reap, exit status.

The child gets its own pipes for stdout and stderr (read by `sources.child_output`)
and inherits stdin. Signals the platform sends the agent are forwarded to the
child. When the agent is PID 1 it also reaps orphaned zombies, so it waits with
`waitpid(-1)` and recognises its child's status among them; `subprocess.Popen`
is used only to spawn. A child that has not exited `stop_grace` seconds after a
forwarded SIGTERM/SIGINT is killed, so the agent keeps time to flush before the
platform's own SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from agent.log import get_logger

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT)
# A fallback poll in case a SIGCHLD is missed (they coalesce; handlers can race startup).
REAP_POLL_S = 1.0
FAST_POLL_S = 0.05  # when neither SIGCHLD nor a pidfd can tell us

_log = get_logger("supervisor")


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    """Spawns and supervises one child.

    Args:
        argv: the command and its arguments.
        env: the child's environment.
        stop_grace: seconds after a forwarded stop signal before SIGKILL.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], stop_grace: float) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.stop_grace = stop_grace
        self.process: subprocess.Popen[bytes] | None = None
        self.reaped_orphans = 0
        self.stop_requested = asyncio.Event()
        self._status: asyncio.Future[int] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._pid1 = os.getpid() == 1
        self._poll_every = REAP_POLL_S

    def start(self) -> tuple[int, int]:
        """Spawn the child; return the read ends of its stdout and stderr pipes.

        Raises:
            OSError: the command could not be started (not found, not executable).
        """
        loop = asyncio.get_running_loop()
        self._status = loop.create_future()
        try:
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            sigchld = True
        except RuntimeError:  # uvloop keeps SIGCHLD for itself: watch the child's pidfd instead
            sigchld = False
        self.process = subprocess.Popen(  # noqa: S603 - running the user's command is the job
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, bufsize=0,
        )
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        assert self.process.stdout is not None and self.process.stderr is not None
        out, err = self.process.stdout.fileno(), self.process.stderr.fileno()
        # The reader threads own the descriptors from here; detach them from Popen.
        fds = (os.dup(out), os.dup(err))
        self.process.stdout.close()
        self.process.stderr.close()
        if not sigchld:
            self._watch_pidfd(loop, self.process.pid)
        self._reap()
        loop.create_task(self._poll())
        _log.info("child_started", pid=self.process.pid, argv=self.argv)
        return fds

    async def wait(self) -> int:
        """Wait for the child; return its exit code (128+N if killed by signal N)."""
        assert self._status is not None
        code = await self._status
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._restore_signals()
        return code

    def _forward(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.returncode is not None:
            if sig in STOPPING:
                self.stop_requested.set()
            return
        try:
            os.kill(self.process.pid, sig)
        except ProcessLookupError:
            return
        _log.info("signal_forwarded", signal=sig.name, pid=self.process.pid)
        if sig in STOPPING:
            self.stop_requested.set()
            if self._kill_timer is None:
                loop = asyncio.get_running_loop()
                self._kill_timer = loop.call_later(self.stop_grace, self._kill)

    def _kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            _log.warning("child_killed", pid=self.process.pid, reason="stop_grace_expired",
                         stop_grace_s=self.stop_grace)
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        """Collect exited children: ours, and (as PID 1) any orphan."""
        if self.process is None:
            return
        target = -1 if self._pid1 else self.process.pid
        while True:
            try:
                pid, status = os.waitpid(target, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.process.pid:
                code = exit_code(status)
                self.process.returncode = code
                if self._status is not None and not self._status.done():
                    self._status.set_result(code)
                _log.info("child_exited", pid=pid, exit_code=code)
                if not self._pid1:
                    return
            else:
                self.reaped_orphans += 1

    def _watch_pidfd(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        """Reap as soon as the child exits, without SIGCHLD (Linux ≥ 5.3 pidfds); with no
        pidfd, the poll below runs often enough instead."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._poll_every = FAST_POLL_S
            return

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._reap()

        loop.add_reader(fd, exited)

    async def _poll(self) -> None:
        assert self._status is not None
        while not self._status.done():
            await asyncio.sleep(self._poll_every)
            self._reap()

    def _restore_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.remove_signal_handler(sig)
            loop.add_signal_handler(sig, self.stop_requested.set)
