"""The agent's own logs: structlog JSON lines on stderr, apart from the child's output.

One format everywhere: every agent line, from `run` and from the one-shot commands
(`check-config`, `dashboard`), is one JSON object on stderr, whatever stderr is (a
pipe, a file, a terminal), so stdout carries only the commands' output (the child's
stdout, or the JSON a command prints) and a log collector parses every agent line.
"""

from __future__ import annotations

import logging
from typing import Any, TextIO

import structlog

from agent.stdio import STDERR, StdioWriter

_generation = 0  # counts `configure_logging` calls
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _LineFile:
    """A minimal file object that hands each whole rendered line to a `StdioWriter`.

    It keeps text until its newline: a line handed over in two pieces could let the
    child's output in between.
    """

    def __init__(self, writer: StdioWriter) -> None:
        self._writer = writer
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._writer.write_agent(line.encode("utf-8", errors="replace") + b"\n")
        return len(text)

    def flush(self) -> None:
        """Whole lines are handed over at once; nothing to do."""


def configure_logging(level: str = "info", writer: StdioWriter = STDERR) -> None:
    """Render the agent's events as one JSON object per line on stderr.

    Args:
        level: debug, info, warning or error.
        writer: where lines go (stderr, shared with the child's pass-through).
    """
    global _generation  # noqa: PLW0603 - loggers made earlier rebind on their next call
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
        logger_factory=structlog.WriteLoggerFactory(file=_as_textio(file)),  # one write a line
        cache_logger_on_first_use=False,
    )
    _generation += 1


def _add_name(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Every line says it is the agent's, from any thread (contextvars do not cross threads)."""
    event["logger"] = "telemetry-agent"
    return event


def _as_textio(obj: Any) -> TextIO:
    return obj  # type: ignore[no-any-return]


class _Logger:
    """A component's logger that follows the configuration in force when it logs.

    Modules make their loggers at import, which may come before `configure_logging`;
    binding then would keep structlog's default (console text on stdout). This rebinds
    once per `configure_logging` call and is otherwise a plain attribute lookup.
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: Any = None

    def __getattr__(self, method: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger().bind(component=self._name)
            self._generation = _generation
        return getattr(self._bound, method)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose events carry `component=name`."""
    logger: Any = _Logger(name)
    return logger  # type: ignore[no-any-return]


def first_or_every(count: int, nth: int = 100, step: int = 1) -> bool:
    """Whether a repeated event gets a log line: the first (someone must hear of it) and
    every `nth` after (a steady fault stays visible without flooding the log).

    `count` is the running total after this occurrence, which added `step` to it (a
    datagram with three bad lines adds 3): the line is due when the step reached 1 or
    crossed a multiple of `nth`, so no line is skipped for jumping past the mark.
    """
    before = count - step
    if count < 1 or step < 1:
        return False
    return before < 1 or (nth > 0 and before // nth < count // nth)
