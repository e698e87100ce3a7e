"""The agent's exception tree, in one place.

    AgentError
    ├── ConfigError       bad configuration; lists every bad key at once
    └── DeliveryError     an AWS call failed; `retryable` says whether to try again
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """One or more configuration values are invalid.

    Args:
        problems: one human sentence per bad value, each naming the variable,
            the value given and what is accepted.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        noun = "error" if len(self.problems) == 1 else "errors"
        lines = [f"{len(self.problems)} configuration {noun}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DeliveryError(AgentError):
    """An AWS call did not succeed.

    Args:
        message: what happened, without credentials.
        code: the AWS error code, or a transport error name.
        kind: the failure kind, a `agent.rules.retry.Failure` value: "throttled",
            "transient", "auth" or "invalid".
        unknown_outcome: the request may have been applied although no answer came
            (a read timeout, a reset after sending); a retry may duplicate it.
    """

    def __init__(self, message: str, *, code: str, kind: str, unknown_outcome: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.unknown_outcome = unknown_outcome

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later."""
        return self.kind != "invalid"

    @property
    def throttled(self) -> bool:
        """Whether the service asked us to slow down."""
        return self.kind == "throttled"
