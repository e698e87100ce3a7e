"""An oracle for what CloudWatch refuses in a PutMetricData call, written apart from the agent.

botocore's own parameter validation (types, minimum lengths) and the service model's
maximum lengths, list sizes and unit enum (botocore leaves those to the service),
plus what the model does not say but the service enforces: printable
ASCII names and values with a non-space character, unique dimension names, and
numbers that are 0 or within 8.515920e-109..1.174271e108 in magnitude (the
documented bounds; real CloudWatch refuses 1/10 of the lower one).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

LOWEST = 8.515920e-109
HIGHEST = 1.174271e108


@cache
def _shape() -> Any:
    import boto3

    client = boto3.session.Session().client("cloudwatch", region_name="us-east-1")
    return client.meta.service_model.operation_model("PutMetricData").input_shape


def _limit(path: str, key: str) -> Any:
    """A constraint from the service model: `path` like "MetricData.member.Dimensions"."""
    shape = _shape()
    for part in path.split("."):
        shape = shape.member if part == "member" else shape.members[part]
    return shape.metadata.get(key)


def _text_ok(text: str) -> bool:
    return all(" " <= ch <= "~" for ch in text) and text.strip() != ""


def _number_ok(value: Any) -> bool:
    return (isinstance(value, int | float) and math.isfinite(value)
            and (value == 0 or LOWEST <= abs(value) <= HIGHEST))


def call_problems(params: dict[str, Any]) -> list[str]:
    """Every reason the service would refuse this PutMetricData call's content."""
    from botocore.validate import ParamValidator

    report = ParamValidator().validate(params, _shape())
    problems = [report.generate_report()] if report.has_errors() else []
    namespace = params.get("Namespace", "")
    if not _text_ok(namespace) or namespace.startswith(":"):
        problems.append(f"namespace {namespace!r}")
    units = set(_shape().members["MetricData"].member.members["Unit"].enum)
    max_dims = _limit("MetricData.member.Dimensions", "max")
    max_name = _limit("MetricData.member.MetricName", "max")
    max_dim_name = _limit("MetricData.member.Dimensions.member.Name", "max")
    max_dim_value = _limit("MetricData.member.Dimensions.member.Value", "max")
    if len(params.get("MetricData", [])) > 1000:
        problems.append("more than 1,000 datums")
    for n, datum in enumerate(params.get("MetricData", [])):
        if datum.get("Unit", "None") not in units:
            problems.append(f"#{n} unit {datum.get('Unit')!r}")
        if len(datum.get("Dimensions", [])) > max_dims or len(datum.get("Values", [])) > 150:
            problems.append(f"#{n} over {max_dims} dimensions or 150 values")
        if len(datum.get("MetricName", "")) > max_name or any(
                len(d.get("Name", "")) > max_dim_name or len(d.get("Value", "")) > max_dim_value
                for d in datum.get("Dimensions", [])):
            problems.append(f"#{n} a name or value over its maximum length")
        if not _text_ok(datum.get("MetricName", "")):
            problems.append(f"#{n} metric name {datum.get('MetricName')!r}")
        dims = datum.get("Dimensions", [])
        names = [d.get("Name", "") for d in dims]
        if len(set(names)) != len(names):
            problems.append(f"#{n} duplicate dimension names {names}")
        for d in dims:
            if not _text_ok(d.get("Name", "")) or d.get("Name", "").startswith(":"):
                problems.append(f"#{n} dimension name {d.get('Name')!r}")
            if not _text_ok(d.get("Value", "")):
                problems.append(f"#{n} dimension value {d.get('Value')!r}")
        numbers = list(datum.get("Values", [])) + list(datum.get("Counts", []))
        numbers += list(datum.get("StatisticValues", {}).values())
        if "Value" in datum:
            numbers.append(datum["Value"])
        problems += [f"#{n} number {v!r}" for v in numbers if not _number_ok(v)]
    return problems
