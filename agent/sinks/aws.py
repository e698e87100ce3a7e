"""The one place the agent talks to AWS: boto3 clients, calls off the loop, errors, retries.

`AwsCaller.deliver` records a call in the file sink (when one is configured) and,
when CloudWatch is on, makes it through boto3 in a worker thread, retrying by
the one retry policy (`agent.rules.retry`) until it succeeds, fails for good,
or its deadline comes. With CloudWatch off it is a dry run: the record is all
that happens and the call "succeeds" with an empty answer. botocore errors
become `DeliveryError` here and nowhere else; botocore's own retries are off,
so that one policy decides.

Clients are built once per service with boto3's standard configuration chain:
`AWS_REGION`, the credentials chain, `AWS_ENDPOINT_URL`,
`AWS_ENDPOINT_URL_CLOUDWATCH` and `AWS_ENDPOINT_URL_CLOUDWATCH_LOGS` all work as
in any boto3 program. A client is rebuilt after rejected or expired credentials,
so refreshed ones are picked up.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from typing import Any

from agent.errors import DeliveryError
from agent.log import get_logger
from agent.rules.retry import DEFAULT_POLICY, UNKNOWN_OUTCOME_ERRORS, Failure, RetryPolicy, classify
from agent.sinks.file import FileSink
from agent.sinks.prometheus import Series

_log = get_logger("aws")
# Once the agent is stopping, the longest wait between two tries of a call.
HURRY_RETRY_S = 0.5
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def snake(api: str) -> str:
    """`PutLogEvents` -> `put_log_events`."""
    return _SNAKE.sub("_", api).lower()


class AwsCaller:
    """Makes (or, in a dry run, records) AWS calls, with retries.

    Args:
        send: whether to really call AWS.
        file_sink: where every call is recorded, or None.
        region: the region for the clients (None: boto3's own chain decides).
        timeout: seconds to wait for an answer (the connect timeout is at most 3 s of it).
        policy: the retry policy.

    `stats` counts, by (what, api, detail): "calls" by outcome ("ok" or a failure
    kind), "retries" by failure kind, "bytes" (request parameters' size, for logs the
    batch size), and "possible_duplicates": items of attempts whose fate was unknown
    (no answer after sending), each of which the service may have stored although
    the batch is sent again: an upper bound on duplicates (at-least-once).
    """

    def __init__(self, *, send: bool, file_sink: FileSink | None, region: str | None,
                 timeout: float = 10.0, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.send = send
        self.file_sink = file_sink
        self._region = region
        self._timeouts = (min(3.0, timeout), timeout)
        self._policy = policy
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._failing_since: dict[str, float] = {}
        self.stats: Counter[tuple[str, str, str]] = Counter()
        self._hurried = False
        self._wake: asyncio.Event | None = None

    def counters(self) -> dict[str, int]:
        """Retries of every call, together (per API and kind: `stats`, on Prometheus)."""
        return {"retries": sum(v for k, v in self.stats.items() if k[0] == "retries")}

    def hurry(self) -> None:
        """Shutdown: calls waiting out a backoff try again now, and from then on at least
        every `HURRY_RETRY_S` (the shutdown deadline bounds them), so a long backoff begun
        during an outage cannot outlast the flush and push its batch into the spool."""
        self._hurried = True
        if self._wake is not None:
            self._wake.set()

    async def _backoff(self, delay: float) -> None:
        """Wait `delay` (capped by the caller once hurried), or until `hurry` is called."""
        if self._hurried:  # the event is set for good: a plain sleep
            await asyncio.sleep(delay)
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            pass

    def series(self) -> list[Series]:
        """`stats` for Prometheus: `aws_calls{api,outcome}`, `aws_retries{api,kind}`, ..."""
        return [Series(f"aws_{what}", {"api": api, **({"outcome": detail} if what == "calls"
                                                      else {"kind": detail} if detail else {})},
                       float(v)) for (what, api, detail), v in self.stats.items()]

    async def deliver(self, service: str, api: str, params: dict[str, Any], *,
                      deadline: float, items: int = 1, size: int = 0,
                      final: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Record the call, then make it until it succeeds; return the answer.

        Args:
            deadline: `time.monotonic()` after which no further attempt starts.
            items: events or datums in the call (for the duplicate count).
            size: bytes the call carries (for self-telemetry).
            final: error codes raised at once, without retrying, whatever their kind: the
                caller has a way on (CreateLogGroup denied: the group may exist).

        Raises:
            DeliveryError: a failure retrying cannot fix (`retryable` false), or the
                deadline came first (`retryable` true: keep the data, try later).
        """
        if self.file_sink is not None:
            self.file_sink.record(api, params)
        if not self.send:
            return {}
        attempt = 0
        while True:
            try:
                result = await asyncio.to_thread(self._call_sync, service, api, params)
            except DeliveryError as exc:
                self.stats["calls", api, exc.kind] += 1
                if exc.unknown_outcome:  # this attempt may have been stored: a re-send may duplicate
                    self.stats["possible_duplicates", api, ""] += items
                self._note_failure(api, exc)
                if not exc.retryable or exc.code in final:
                    raise
                delay = self._policy.delay(attempt, Failure(exc.kind))
                if self._hurried:
                    delay = min(delay, HURRY_RETRY_S)
                if time.monotonic() + delay > deadline:
                    raise
                self.stats["retries", api, exc.kind] += 1
                attempt += 1
                await self._backoff(delay)
                continue
            self.stats["calls", api, "ok"] += 1
            self.stats["bytes", api, ""] += size
            self._note_success(api, attempt)
            return result

    def _note_failure(self, api: str, exc: DeliveryError) -> None:
        if api not in self._failing_since:
            self._failing_since[api] = time.monotonic()
            _log.warning("delivery_failing", api=api, code=exc.code, kind=exc.kind,
                         error=str(exc), then="retrying" if exc.retryable else "dropping the batch")

    def _note_success(self, api: str, attempts: int) -> None:
        since = self._failing_since.pop(api, None)
        if since is not None:
            _log.info("delivery_recovered", api=api, failed_s=round(time.monotonic() - since, 1),
                      retries=attempts)

    def warm_up(self, services: tuple[str, ...] = ("logs", "cloudwatch")) -> None:
        """Import boto3 and build the clients now (≈ 0.5 s), in a thread while the child starts,
        rather than in front of the first batch. Failures are left for the first call to meet."""
        for service in services:
            try:
                self._client(service)
            except Exception:  # noqa: BLE001, S112 - reported by the first real call
                continue

    def _client(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is not None:
            return client
        with self._lock:
            return self._build(service)

    def _build(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is None:
            import boto3  # noqa: PLC0415 - boto3 costs ~0.3 s to import; dry runs never need it
            from botocore.config import Config  # noqa: PLC0415

            # Parameter validation re-checks every event of every batch (half of botocore's CPU
            # per PutLogEvents here); the batching rules already guarantee what it checks.
            config = Config(connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
                            retries={"total_max_attempts": 1}, max_pool_connections=4,
                            tcp_keepalive=True, parameter_validation=False)
            client = boto3.session.Session().client(service, region_name=self._region, config=config)
            self._clients[service] = client
        return client

    def _call_sync(self, service: str, api: str, params: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            result: dict[str, Any] = getattr(self._client(service), snake(api))(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            kind = classify(code, status)
            if kind is Failure.AUTH:
                self._clients.pop(service, None)  # rebuilt on the next call, with fresh credentials
            message = str(error.get("Message", ""))[:300]
            raise DeliveryError(f"{api} failed: {code}: {message}", code=code,
                                kind=kind.value) from None
        except BotoCoreError as exc:
            # Connection refused or reset, timeouts, DNS, credentials missing...
            name = type(exc).__name__
            kind = classify(name)
            if kind is Failure.AUTH:
                self._clients.pop(service, None)
            raise DeliveryError(f"{api} failed: {name}", code=name, kind=kind.value,
                                unknown_outcome=name in UNKNOWN_OUTCOME_ERRORS) from None
        return result
