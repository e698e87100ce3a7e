"""The one retry policy: which failures are worth another try, and how long to wait.

Both CloudWatch sinks use it through `AwsCaller.deliver`. The rules (docs/architecture.md):
throttling, 5xx, timeouts and connection errors are retried with jittered
exponential backoff, longer for throttling; rejected credentials are retried
slowly (a rotated role or a fixed secret brings them back, and dropping data
because of an IAM typo would be the wrong trade); every other client error
(InvalidParameter...) drops the batch, counted and logged.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class Failure(enum.Enum):
    """What kind of failure an AWS answer (or the lack of one) is."""

    THROTTLED = "throttled"  # the service asked us to slow down
    TRANSIENT = "transient"  # 5xx, timeout, refused or reset connection
    AUTH = "auth"            # credentials missing, rejected or expired
    INVALID = "invalid"      # the request itself is wrong: retrying cannot help

    @property
    def retryable(self) -> bool:
        return self is not Failure.INVALID


# Error codes from the AWS APIs (CloudWatch's query-compatible names included).
THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
    "TooManyRequestsException", "LimitExceededException", "RequestThrottled",
    "RequestThrottledException", "SlowDown", "ProvisionedThroughputExceededException",
})
TRANSIENT_CODES = frozenset({
    "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure", "InternalError",
    "InternalServiceError", "InternalServiceFault", "InternalServerError", "RequestTimeout",
    "RequestTimeoutException", "OperationAbortedException", "PriorRequestNotComplete",
})
AUTH_CODES = frozenset({
    "ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId",
    "UnrecognizedClientException", "InvalidSignatureException", "SignatureDoesNotMatch",
    "AccessDenied", "AccessDeniedException", "MissingAuthenticationToken",
    "IncompleteSignature", "NoCredentialsError", "PartialCredentialsError",
    "CredentialRetrievalError",
})
# botocore transport errors after which the request may or may not have been applied:
# a retry can duplicate it (at-least-once), and the sinks count those events.
UNKNOWN_OUTCOME_ERRORS = frozenset({
    "ReadTimeoutError", "ConnectionClosedError", "ResponseStreamingError",
    "IncompleteReadError", "HTTPClientError",
})


def classify(code: str, status: int = 0) -> Failure:
    """The failure kind for an AWS error code (or botocore exception name) and HTTP status."""
    if code in THROTTLE_CODES or status == 429:
        return Failure.THROTTLED
    if code in AUTH_CODES or code.startswith("ExpiredToken"):
        return Failure.AUTH
    if code in TRANSIENT_CODES or status >= 500:
        return Failure.TRANSIENT
    if status == 0:
        # No HTTP answer at all: a transport error (refused, reset, timed out, DNS).
        return Failure.INVALID if code in ("ParamValidationError", "NoRegionError") else Failure.TRANSIENT
    return Failure.INVALID


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff delays per failure kind.

    Transient failures use "full jitter" (AWS Architecture Blog, "Exponential
    Backoff And Jitter"): uniform in [0, min(cap, base * 2**attempt)], which
    spreads a fleet's retries best. Throttling uses "equal jitter", so the wait
    never drops below half the step: the service asked for less traffic. Rejected
    credentials wait longest; they rarely fix themselves within seconds.
    """

    base: float = 0.1
    cap: float = 10.0
    throttle_base: float = 0.5
    throttle_cap: float = 20.0
    auth_base: float = 5.0
    auth_cap: float = 60.0

    def delay(self, attempt: int, failure: Failure, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 = the first retry)."""
        uniform = (rng or random).uniform
        step = min(attempt, 30)  # 2**30 already exceeds every cap
        if failure is Failure.THROTTLED:
            ceiling = min(self.throttle_cap, self.throttle_base * 2 ** step)
            return ceiling / 2 + uniform(0, ceiling / 2)
        if failure is Failure.AUTH:
            return min(self.auth_cap, self.auth_base * 2 ** step)
        return uniform(0, min(self.cap, self.base * 2 ** step))


DEFAULT_POLICY = RetryPolicy()
