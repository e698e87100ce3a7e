"""The agent's own logs: structlog JSON lines on stderr, apart from the child's output."""

from __future__ import annotations

import logging
from typing import Any, TextIO

import structlog

from agent.stdio import STDERR, StdioWriter

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _LineFile:
    """A minimal file object that hands each rendered line to a `StdioWriter`."""

    def __init__(self, writer: StdioWriter) -> None:
        self._writer = writer

    def write(self, text: str) -> int:
        self._writer.write_agent(text.encode("utf-8", errors="replace"))
        return len(text)

    def flush(self) -> None:
        """Writes are unbuffered; nothing to do."""


def configure_logging(level: str = "info", writer: StdioWriter = STDERR) -> None:
    """Render the agent's events as one JSON object per line on stderr.

    Args:
        level: debug, info, warning or error.
        writer: where lines go (stderr, shared with the child's pass-through).
    """
    file: Any = _LineFile(writer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_as_textio(file)),
        cache_logger_on_first_use=False,
    )


def _add_name(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Every line says it is the agent's, from any thread (contextvars do not cross threads)."""
    event["logger"] = "telemetry-agent"
    return event


def _as_textio(obj: Any) -> TextIO:
    return obj  # type: ignore[no-any-return]


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose events carry `component=name`."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(component=name)
    return logger
