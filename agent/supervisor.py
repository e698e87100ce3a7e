"""Runs the model server as the agent's child: spawn, forward signals, reap, exit status.

The child gets its own pipes for stdout and stderr (read by `sources.child_output`)
and inherits stdin. When the agent is PID 1 it also reaps orphaned zombies, so it
waits with `waitpid(-1)` and recognises its child's status among them;
`subprocess.Popen` is used only to spawn. A child that has not exited `stop_grace`
seconds after a forwarded SIGTERM/SIGINT is killed, with its process group, so the
agent keeps time to flush before the platform's own SIGKILL.

Signals, as a well-behaved init does them (dumb-init's default mode):
- The child runs in a session (and process group) of its own, so signals a terminal
  sends to its foreground process group (Ctrl-C: SIGINT, Ctrl-\\: SIGQUIT) reach the
  agent only, and the agent forwards each exactly once to the child: the child sees
  one SIGINT per Ctrl-C, with a TTY (`docker run -it`, a shell) or without one.
- Forwarded signals go to the child itself, not to its whole group: a model server
  that manages workers (gunicorn) decides what they get; SIGKILL after the grace goes
  to the group, so no straggler keeps the pipes open.
- The child has no controlling terminal (setsid). It still reads and writes the
  terminal through the descriptors it inherits, and, not being in that terminal's
  session, is never stopped by SIGTTIN/SIGTTOU for doing so (a child merely put in a
  background process group would be); what it cannot do is open `/dev/tty` or get the
  terminal's own signals (SIGWINCH) directly. This is dumb-init's trade-off too; tini's
  alternative (the child's group made the terminal's foreground group with tcsetpgrp)
  would let Ctrl-C bypass the agent.
- Job control: on Ctrl-Z (SIGTSTP), or SIGTTIN/SIGTTOU, the agent stops the child's
  group (SIGSTOP) and then itself; when continued (`fg`/`bg`: SIGCONT) it continues the
  child's group.
- From `hold_signals()` (called first thing by the CLI) until the child is spawned,
  stop signals are blocked, not lost: they stay pending and are forwarded to the child
  as soon as it runs.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from agent.log import get_logger

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT)
# Terminal job control (Ctrl-Z, a background read or write): the agent stops the child, then
# itself, and continues the child when it is continued (`fg`, `bg`), as dumb-init does.
JOB_CONTROL = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# A fallback poll in case a SIGCHLD is missed (they coalesce; handlers can race startup).
REAP_POLL_S = 1.0
FAST_POLL_S = 0.05  # when neither SIGCHLD nor a pidfd can tell us

EXIT_NOT_FOUND, EXIT_CANNOT_EXECUTE = 127, 126  # as a shell reports them

_log = get_logger("supervisor")


def hold_signals() -> None:
    """Block the forwarded signals in this thread (and the threads it starts) until
    `release_signals`: one that arrives while the agent starts waits, pending, for the
    child instead of being lost or killing the agent half-started."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)


def release_signals() -> None:
    """Unblock the forwarded signals; pending ones are delivered now (to the handlers set
    by then, or with their default action)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def spawn_exit_code(exc: OSError) -> int:
    """The shell's exit code for a command that could not be started: 127 when it does
    not exist, 126 when it exists but cannot be executed (no permission, not a program
    the kernel can run: ENOEXEC for a script without `#!`, a directory, ...)."""
    return EXIT_NOT_FOUND if exc.errno in (errno.ENOENT, errno.ENOTDIR) else EXIT_CANNOT_EXECUTE


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _ignore() -> None:
    """A stop signal after the child exited: the agent is already stopping."""


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
        self.orphans_reaped = 0
        self._status: asyncio.Future[int] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._pid1 = os.getpid() == 1
        self._poll_every = REAP_POLL_S

    def start(self) -> tuple[int, int]:
        """Spawn the child; return the read ends of its stdout and stderr pipes.

        Raises:
            OSError: the command could not be started (`spawn_exit_code` maps it).
        """
        loop = asyncio.get_running_loop()
        self._status = loop.create_future()
        try:
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            sigchld = True
        except RuntimeError:  # uvloop keeps SIGCHLD for itself: watch the child's pidfd instead
            sigchld = False
        # Handlers first, then unblock: a signal held since start-up runs `_forward` on the
        # loop's next turn, after the child below exists.
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        for sig in JOB_CONTROL:
            loop.add_signal_handler(sig, self._suspend, sig)
        loop.add_signal_handler(signal.SIGCONT, self._resume)
        release_signals()
        self.process = subprocess.Popen(  # noqa: S603 - running the user's command is the job
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, bufsize=0, start_new_session=True,
        )
        _log.info("child_started", pid=self.process.pid, argv=self.argv)
        assert self.process.stdout is not None and self.process.stderr is not None
        out, err = self.process.stdout.fileno(), self.process.stderr.fileno()
        # The reader threads own the descriptors from here; detach them from Popen.
        fds = (os.dup(out), os.dup(err))
        self.process.stdout.close()
        self.process.stderr.close()
        if not sigchld:
            self._watch_pidfd(loop, self.process.pid)
        self._reap()  # it may have exited already (after `child_started`, never before)
        loop.create_task(self._poll())
        return fds

    async def wait(self) -> int:
        """Wait for the child; return its exit code (128+N if killed by signal N)."""
        assert self._status is not None
        code = await self._status
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._restore_signals()
        return code

    def counters(self) -> dict[str, int]:
        """As PID 1, the orphans re-parented to the agent and reaped."""
        return {"orphans_reaped": self.orphans_reaped}

    def _forward(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.kill(self.process.pid, sig)
        except ProcessLookupError:
            return
        _log.info("signal_forwarded", signal=sig.name, pid=self.process.pid)
        if sig in STOPPING:
            if self._kill_timer is None:
                loop = asyncio.get_running_loop()
                self._kill_timer = loop.call_later(self.stop_grace, self._kill)

    def _suspend(self, sig: signal.Signals) -> None:
        """Stop the child's group, then the agent. SIGSTOP, not `sig`: the child's group is
        orphaned (its parent, the agent, is in another session), and the kernel discards a
        SIGTSTP/SIGTTIN/SIGTTOU sent to an orphaned group."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            return
        _log.info("child_suspended", signal=sig.name, pid=self.process.pid)
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once continued

    def _resume(self) -> None:
        """The agent was continued: continue the child's group (harmless if not stopped)."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            _log.warning("child_killed", pid=self.process.pid, reason="stop_grace_expired",
                         stop_grace_s=self.stop_grace)
            try:  # the child leads its own group (setsid): take its stragglers too
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
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
                self.orphans_reaped += 1

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
            # The agent is flushing: a second SIGTERM must not cut that short (SageMaker's
            # SIGKILL ends it if it overruns).
            loop.add_signal_handler(sig, _ignore)
        for sig in (*JOB_CONTROL, signal.SIGCONT):
            loop.remove_signal_handler(sig)
