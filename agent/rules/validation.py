"""CloudWatch's rules for a datum, checked when a figure enters aggregation (pure).

PutMetricData refuses a whole call for one bad datum (`InvalidParameterValue`), so
one StatsD line with a strange value or name would cost every figure that shares
its call, SageMaker's Invocations included. Every figure is therefore checked at
the door, before it can reach a call: what fails is dropped and counted by reason.

The rules (PutMetricData API reference, MetricDatum and Dimension):

- namespace 1-255 characters, ASCII, not starting with `:`;
- metric name 1-255 characters; dimension name 1-255, not starting with `:`;
  dimension value 1-1024; all printable ASCII with at least one non-space
  character; at most 30 dimensions, names unique;
- a unit from the `StandardUnit` set;
- values finite; the API states -2^360..2^360, and real CloudWatch refuses
  magnitudes above 1.174271e108 or below 8.515920e-109 other than 0 (the
  documented decimal bounds, about 2^±359: `API_MAX`, `API_MIN`).

The door is narrower than the API on purpose (`MAX_VALUE` = 2^300, `MIN_MAGNITUDE`
= 2^-260): sums of up to 2^58 accepted values stay within `API_MAX`, and any sum or
difference of accepted values is 0 or a multiple of 2^-312, so aggregation itself
can never produce a number the API refuses. `number_problem` checks the final
numbers against the API's own bounds (a last guard before a call).
"""

from __future__ import annotations

import math

from agent.model import MetricKey

MAX_NAME = 255
MAX_DIMENSION_VALUE = 1024
MAX_DIMENSIONS = 30
API_MAX = 1.174271e108     # largest magnitude CloudWatch accepts (documented, about 2^359)
API_MIN = 8.515920e-109    # smallest non-zero magnitude it accepts (about 2^-359)
MAX_VALUE = 2.0 ** 300     # the door's bound for one value
MIN_MAGNITUDE = 2.0 ** -260  # the door's smallest non-zero magnitude

UNITS = frozenset({
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second", "Gigabits/Second",
    "Terabits/Second", "Count/Second", "None"})

# Every reason a figure can be refused at the door (the counters' names).
REASONS = ("value_not_finite", "value_too_large", "value_too_small", "namespace",
           "metric_name_length", "metric_name_charset", "too_many_dimensions",
           "dimension_name_length", "dimension_name_charset", "dimension_value_length",
           "dimension_value_charset", "dimension_duplicate", "unit")


def value_problem(value: float) -> str | None:
    """Why one value may not enter aggregation, or None: finite, 0 or within
    `MIN_MAGNITUDE`..`MAX_VALUE` in magnitude."""
    magnitude = abs(value)
    if MIN_MAGNITUDE <= magnitude <= MAX_VALUE or value == 0.0:
        return None
    if not math.isfinite(value):
        return "value_not_finite"
    return "value_too_large" if magnitude > MAX_VALUE else "value_too_small"


def number_problem(value: float) -> str | None:
    """Why a number in a finished datum would make the API refuse the call, or None."""
    magnitude = abs(value)
    if API_MIN <= magnitude <= API_MAX or value == 0.0:
        return None
    if not math.isfinite(value):
        return "value_not_finite"
    return "value_too_large" if magnitude > API_MAX else "value_too_small"


def _printable(text: str) -> bool:
    """Printable ASCII (space to `~`) with at least one character that is not a space."""
    return text.isascii() and text.isprintable() and not text.isspace()


def _ok(text: str, limit: int) -> bool:
    return 0 < len(text) <= limit and text.isascii() and text.isprintable() and not text.isspace()


def text_problem(text: str, limit: int, what: str) -> str | None:
    """`<what>_length` or `<what>_charset` for a name or value, or None."""
    if not 1 <= len(text) <= limit:
        return f"{what}_length"
    if not _printable(text):
        return f"{what}_charset"
    return None


def series_problem(name: str, dims: tuple[tuple[str, str], ...]) -> str | None:
    """Why a metric name with these dimensions would be refused, or None. Runs for every
    new custom series (a flood of names costs this each), so the common case is one pass."""
    if (_ok(name, MAX_NAME) and len(dims) <= MAX_DIMENSIONS
            and all(_ok(n, MAX_NAME) and _ok(v, MAX_DIMENSION_VALUE) and n[0] != ":"
                    for n, v in dims)
            and len({n for n, _ in dims}) == len(dims)):
        return None
    problem = text_problem(name, MAX_NAME, "metric_name")
    if problem:
        return problem
    if len(dims) > MAX_DIMENSIONS:
        return "too_many_dimensions"
    for dim_name, value in dims:
        problem = (text_problem(dim_name, MAX_NAME, "dimension_name")
                   or text_problem(value, MAX_DIMENSION_VALUE, "dimension_value"))
        if problem:
            return problem
        if dim_name.startswith(":"):
            return "dimension_name_charset"
    return "dimension_duplicate"


def key_problem(key: MetricKey) -> str | None:
    """Why a metric (namespace, name, dimensions, unit) would be refused, or None."""
    namespace = key.namespace
    if not _ok(namespace, MAX_NAME) or namespace.startswith(":"):
        return "namespace"
    problem = series_problem(key.name, key.dimensions)
    if problem:
        return problem
    if key.unit not in UNITS:
        return "unit"
    return None
