"""Background tasks that cannot die: one supervisor for every long-running coroutine.

Every loop the agent runs in the background (the publisher, each sink's delivery
loop, the instance sampler, the framing of the child's output) runs under
`supervise`. A task that returns is done; a cancelled one stays cancelled (that is
how shutdown stops it). One that raises anything else met a bug or a fault nobody
foresaw: it is logged with its traceback (the first time, then every 100th), counted
in `task_failures`, and started again after the retry policy's backoff. A fault that
repeats thus costs a log line and a few tries a minute, never a hot loop (a sender
retried 4,270 times a second before) and never a silent stop.

`guarded` does the same for one step of shutdown: a step that fails is logged and
counted, and the next step runs, so `agent_stopped` is always written.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from agent.log import first_or_every, get_logger
from agent.rules.retry import DEFAULT_POLICY, Failure, RetryPolicy

# A task that ran this long before it failed met a new fault: its backoff starts over.
HEALTHY_S = 60.0

_log = get_logger("tasks")


class TaskFailures:
    """How often each supervised task (or guarded step) failed, for `agent_stopped` and
    Prometheus: `task_failures` in all, and `task_failures_<name>` for each that did."""

    name = "tasks"

    def __init__(self) -> None:
        self.by_task: Counter[str] = Counter()

    def add(self, name: str) -> int:
        """Count one failure of `name`; return its running total."""
        self.by_task[name] += 1
        return self.by_task[name]

    def counters(self) -> dict[str, int]:
        by_task = dict(self.by_task)  # one copy: the loop may count while this is read
        return {"task_failures": sum(by_task.values()),
                **{f"task_failures_{name}": count for name, count in sorted(by_task.items())}}


# The agent's one tally (one agent per process); tests pass their own.
FAILURES = TaskFailures()


def restart_delay(attempt: int, policy: RetryPolicy = DEFAULT_POLICY) -> float:
    """Seconds before restart number `attempt` (0 = the first): the policy's backoff for a
    transient fault, but never below its base step, so even a zero draw of the jitter
    cannot turn a failing task into a hot loop (at most 1/base restarts a second)."""
    return max(policy.base, policy.delay(attempt, Failure.TRANSIENT))


def supervise(name: str, factory: Callable[[], Coroutine[Any, Any, None]],
              policy: RetryPolicy = DEFAULT_POLICY, *,
              failures: TaskFailures = FAILURES) -> asyncio.Task[None]:
    """Run `factory()` as a task named `name` until it returns or is cancelled; restart it
    (a fresh coroutine from `factory`) after each unexpected exception.

    Call from the running event loop. Cancelling the returned task cancels the running
    coroutine or the wait before the next start.
    """
    return asyncio.create_task(_supervised(name, factory, policy, failures), name=name)


async def _supervised(name: str, factory: Callable[[], Coroutine[Any, Any, None]],
                      policy: RetryPolicy, failures: TaskFailures) -> None:
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            await factory()
        except Exception as exc:  # noqa: BLE001 - the point: no exception ends a task silently
            if time.monotonic() - started >= HEALTHY_S:
                attempt = 0
            count = failures.add(name)
            delay = restart_delay(attempt, policy)
            attempt += 1
            if first_or_every(count):
                _log.error("task_failed", task=name, error=repr(exc), failures=count,
                           restart_in_s=round(delay, 3), exc_info=exc)
            await asyncio.sleep(delay)
        else:
            return


async def guarded(name: str, step: Awaitable[object], *,
                  failures: TaskFailures = FAILURES) -> None:
    """Await one step of shutdown; if it raises, log it with its traceback and count it,
    so the steps after it (and `agent_stopped`) still happen. Cancellation passes."""
    try:
        await step
    except Exception as exc:  # noqa: BLE001 - one part's fault must not cost the others
        count = failures.add(name)
        _log.error("step_failed", step=name, error=repr(exc), failures=count, exc_info=exc)


class HasCounters(Protocol):
    def counters(self) -> Mapping[str, int]: ...


def read_counters(name: str, part: HasCounters, *,
                  failures: TaskFailures = FAILURES) -> Mapping[str, int]:
    """`part.counters()`, or nothing (logged and counted) when it raises: one part's broken
    counters must not cost the last log line everybody else's."""
    try:
        return part.counters()
    except Exception as exc:  # noqa: BLE001
        count = failures.add(f"counters_{name}")
        if first_or_every(count):
            _log.error("counters_failed", part=name, error=repr(exc), exc_info=exc)
        return {}
