"""The one place the agent talks to AWS: boto3 clients, calls off the loop, error mapping.

`AwsCaller.call` records every call in the file sink (when one is configured)
and, when CloudWatch is on, makes it through boto3 in a worker thread. With
CloudWatch off it is a dry run: the record is all that happens and the call
"succeeds" with an empty answer. botocore errors become `DeliveryError` here and
nowhere else.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from agent.errors import DeliveryError
from agent.sinks.file import FileSink

# Error codes that mean "try again later" (AWS docs; CloudWatch's query-compatible names too).
THROTTLE_CODES = frozenset({"Throttling", "ThrottlingException", "ThrottledException",
                            "RequestLimitExceeded", "TooManyRequestsException",
                            "LimitExceededException", "RequestThrottled"})
RETRYABLE_CODES = frozenset({"ServiceUnavailable", "ServiceUnavailableException",
                             "InternalFailure", "InternalServiceError", "InternalServiceFault",
                             "RequestTimeout", "RequestTimeoutException", "ExpiredToken",
                             "ExpiredTokenException", "RequestExpired", "OperationAbortedException"})
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def snake(api: str) -> str:
    """`PutLogEvents` -> `put_log_events`."""
    return _SNAKE.sub("_", api).lower()


class AwsCaller:
    """Makes (or, in a dry run, records) AWS calls.

    Args:
        send: whether to really call AWS.
        file_sink: where every call is recorded, or None.
        region: the region for the clients.
        connect_timeout: seconds to connect.
        read_timeout: seconds to wait for an answer.
    """

    def __init__(self, *, send: bool, file_sink: FileSink | None, region: str | None,
                 connect_timeout: float = 3.0, read_timeout: float = 10.0) -> None:
        self.send = send
        self.file_sink = file_sink
        self._region = region
        self._timeouts = (connect_timeout, read_timeout)
        self._clients: dict[str, Any] = {}

    async def call(self, service: str, api: str, params: dict[str, Any]) -> dict[str, Any]:
        """Record and make one call; raise `DeliveryError` when it fails."""
        if self.file_sink is not None:
            self.file_sink.record(api, params)
        if not self.send:
            return {}
        return await asyncio.to_thread(self._call_sync, service, api, params)

    def _client(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is None:
            import boto3  # noqa: PLC0415 - boto3 costs ~0.3 s to import; dry runs never need it
            from botocore.config import Config  # noqa: PLC0415

            config = Config(connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
                            retries={"max_attempts": 1, "mode": "standard"})
            client = boto3.session.Session().client(service, region_name=self._region, config=config)
            self._clients[service] = client
        return client

    def _call_sync(self, service: str, api: str, params: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            result: dict[str, Any] = getattr(self._client(service), snake(api))(**params)
        except ClientError as exc:
            raise _map_client_error(exc, api, self._clients, service) from None
        except BotoCoreError as exc:
            # Connection refused, timeouts, DNS, credentials missing...
            name = type(exc).__name__
            retryable = name not in ("NoCredentialsError", "ParamValidationError", "NoRegionError")
            raise DeliveryError(f"{api} failed: {name}", code=name, retryable=retryable) from None
        return result


def _map_client_error(exc: Any, api: str, clients: dict[str, Any], service: str) -> DeliveryError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code.startswith("ExpiredToken") or code == "RequestExpired":
        clients.pop(service, None)  # rebuilt on the next call, with refreshed credentials
    throttled = code in THROTTLE_CODES or status == 429
    retryable = throttled or code in RETRYABLE_CODES or status >= 500
    message = str(error.get("Message", ""))[:300]
    return DeliveryError(f"{api} failed: {code}: {message}", code=code, retryable=retryable,
                         throttled=throttled)
