"""The retry policy: which failures are retried, and how long the waits are."""

from __future__ import annotations

import random

import pytest

from agent.rules.retry import DEFAULT_POLICY, Failure, classify


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("ThrottlingException", 400, Failure.THROTTLED),
    ("Throttling", 400, Failure.THROTTLED),
    ("Anything", 429, Failure.THROTTLED),
    ("ServiceUnavailable", 503, Failure.TRANSIENT),
    ("InternalFailure", 500, Failure.TRANSIENT),
    ("Weird", 502, Failure.TRANSIENT),
    ("EndpointConnectionError", 0, Failure.TRANSIENT),
    ("ReadTimeoutError", 0, Failure.TRANSIENT),
    ("ExpiredTokenException", 400, Failure.AUTH),
    ("UnrecognizedClientException", 400, Failure.AUTH),
    ("AccessDeniedException", 400, Failure.AUTH),
    ("NoCredentialsError", 0, Failure.AUTH),
    ("InvalidParameterException", 400, Failure.INVALID),
    ("InvalidParameterValue", 400, Failure.INVALID),
    ("ParamValidationError", 0, Failure.INVALID),
])
def test_classify(code: str, status: int, kind: Failure) -> None:
    assert classify(code, status) is kind
    assert kind.retryable is (kind is not Failure.INVALID)


def test_transient_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    first = [DEFAULT_POLICY.delay(0, Failure.TRANSIENT, rng) for _ in range(1000)]
    late = [DEFAULT_POLICY.delay(40, Failure.TRANSIENT, rng) for _ in range(1000)]
    assert 0 <= min(first) and max(first) <= DEFAULT_POLICY.base
    assert max(late) <= DEFAULT_POLICY.cap and max(late) > DEFAULT_POLICY.cap * 0.9
    assert len(set(first)) > 900  # jittered, so a fleet does not retry in step


def test_throttling_waits_longer_than_errors() -> None:
    """Equal jitter: a throttled retry never waits less than half its step."""
    rng = random.Random(2)
    for attempt in range(8):
        step = min(DEFAULT_POLICY.throttle_cap, DEFAULT_POLICY.throttle_base * 2 ** attempt)
        waits = [DEFAULT_POLICY.delay(attempt, Failure.THROTTLED, rng) for _ in range(200)]
        assert step / 2 <= min(waits) and max(waits) <= step
        errors = [DEFAULT_POLICY.delay(attempt, Failure.TRANSIENT, rng) for _ in range(200)]
        assert sum(waits) > sum(errors)


def test_auth_failures_wait_longest_and_are_capped() -> None:
    waits = [DEFAULT_POLICY.delay(a, Failure.AUTH) for a in range(10)]
    assert waits[0] == DEFAULT_POLICY.auth_base and waits[-1] == DEFAULT_POLICY.auth_cap
    assert waits == sorted(waits)
