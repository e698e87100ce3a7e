"""`BatchSender` and `agent.tasks.supervise` directly: a send that raises what nobody
foresaw costs a logged, counted, backed-off restart, never a hot loop or a dead sender.

A real `Outbox` (memory only) feeds a sender whose `send` fails the way a bug would
(RuntimeError, KeyError); everything else is the production loop.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import structlog

from agent.errors import DeliveryError
from agent.log import first_or_every
from agent.rules.retry import RetryPolicy
from agent.sinks.delivery import BatchSender
from agent.sinks.outbox import Codec, Outbox
from agent.tasks import FAILURES, TaskFailures, guarded, restart_delay, supervise

pytestmark = pytest.mark.timeout(60)

# Every restart waits exactly 50 ms: the policy's base is its floor, and the jitter's cap.
STEADY = RetryPolicy(base=0.05, cap=0.05)


def _outbox() -> Outbox[int]:
    codec = Codec(lambda items: json.dumps(items).encode(), lambda data: json.loads(data))
    return Outbox("test", max_bytes=1 << 20, cost=lambda _: 8,
                  cut=lambda items: min(len(items), 10), codec=codec)


class FlakySender(BatchSender[int]):
    """Fails its first `failures` sends with `error`, then delivers."""

    name = "flaky"

    def __init__(self, failures: int, error: Exception, *, policy: RetryPolicy = STEADY) -> None:
        super().__init__(_outbox(), policy=policy)
        self.failures_left = failures
        self.error = error
        self.attempts: list[float] = []
        self.delivered: list[int] = []
        self.failed_often = asyncio.Event()
        self.all_sent = asyncio.Event()
        self.expected = 0

    async def send(self, batch: list[int], deadline: float) -> None:
        self.attempts.append(time.monotonic())
        if self.failures_left > 0:
            self.failures_left -= 1
            if self.failures_left == 0:
                self.failed_often.set()
            raise self.error
        self.delivered.extend(batch)
        if len(self.delivered) >= self.expected:
            self.all_sent.set()

    def dropped(self, batch: list[int], error: DeliveryError) -> None:
        raise AssertionError("nothing here is refused for good")


def test_unexpected_exception_backs_off_is_logged_once_and_the_batch_arrives() -> None:
    """Five RuntimeErrors from `send`: five restarts 50 ms apart (not thousands a second),
    one log line with the traceback, five failures counted, and then every item is
    delivered once, in order. Before, the batch was retried at once, forever, silently."""
    async def scenario() -> FlakySender:
        sender = FlakySender(5, RuntimeError("a bug in send"))
        sender.expected = 25
        sender.outbox.put(range(25))
        sender.start()
        sender.wake()
        async with asyncio.timeout(10):
            await sender.all_sent.wait()
        await sender.stop(time.monotonic() + 5)
        return sender

    before = FAILURES.by_task["sink_flaky"]
    with structlog.testing.capture_logs() as logs:
        sender = asyncio.run(scenario())
    gaps = [b - a for a, b in zip(sender.attempts, sender.attempts[1:6], strict=False)]
    assert len(gaps) == 5 and min(gaps) >= 0.045, gaps
    assert sender.delivered == list(range(25))
    assert FAILURES.by_task["sink_flaky"] - before == 5
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert len(failed) == 1 and failed[0]["task"] == "sink_flaky", failed
    assert "a bug in send" in failed[0]["error"] and failed[0]["exc_info"] is not None
    assert sender.counters()["items_unsent"] == 0


def test_sender_failing_for_good_stops_by_its_deadline_and_counts_what_is_left() -> None:
    """A send that always raises: the loop keeps backing off (a few tries a second, not
    thousands), `stop` returns by its deadline, and every item is still counted unsent."""
    async def scenario() -> tuple[FlakySender, float]:
        sender = FlakySender(10**9, KeyError("shape"), policy=RetryPolicy(base=0.05, cap=0.2))
        sender.outbox.put(range(7))
        sender.start()
        sender.wake()
        await asyncio.sleep(1.0)  # the thing measured: tries in one second
        began = time.monotonic()
        await sender.stop(began + 0.5)
        return sender, time.monotonic() - began

    sender, took = asyncio.run(scenario())
    assert 2 <= len(sender.attempts) <= 25, len(sender.attempts)
    assert took < 1.5
    assert sender.counters()["items_unsent"] == 7


def test_supervise_restarts_returns_and_passes_cancellation() -> None:
    """A coroutine that fails twice and then returns: restarted twice, then the task is
    done; a cancelled one stays cancelled and is not counted."""
    failures = TaskFailures()
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise ValueError("boom")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def scenario() -> bool:
        await supervise("flaky", flaky, STEADY, failures=failures)
        task = supervise("forever", forever, STEADY, failures=failures)
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled()

    assert asyncio.run(scenario()) is True
    assert len(runs) == 3
    assert failures.counters() == {"task_failures": 2, "task_failures_flaky": 2}


def test_guarded_step_failure_is_counted_and_the_next_step_runs() -> None:
    failures = TaskFailures()
    done: list[str] = []

    async def broken() -> None:
        raise OSError("disk gone")

    async def fine() -> None:
        done.append("fine")

    async def scenario() -> None:
        await guarded("stop_broken", broken(), failures=failures)
        await guarded("stop_fine", fine(), failures=failures)

    asyncio.run(scenario())
    assert done == ["fine"]
    assert failures.counters()["task_failures_stop_broken"] == 1


def test_restart_delay_never_below_the_base_step() -> None:
    policy = RetryPolicy(base=0.1, cap=10.0)
    assert all(restart_delay(attempt, policy) >= 0.1 for attempt in range(40) for _ in range(50))
    assert max(restart_delay(30, policy) for _ in range(200)) <= 10.0


@pytest.mark.parametrize(("counts", "nth", "step", "logged"), [
    (range(1, 1001), 100, 1, [1, *range(100, 1001, 100)]),
    ([3, 6, 9, 99, 102, 250], 100, 3, [3, 102]),  # 99 -> 102 crossed 100; 250 is 197 -> 250
    ([0, 5], 100, 0, []),
])
def test_first_or_every(counts: range | list[int], nth: int, step: int,
                        logged: list[int]) -> None:
    assert [c for c in counts if first_or_every(c, nth, step)] == logged
