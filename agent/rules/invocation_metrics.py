"""One request -> SageMaker's invocation metrics (DESIGN §4), as pure figures.

Invocations is 1 per request; Invocation4XXErrors and Invocation5XXErrors are
1 or 0, so their Average is the error rate and their Sum the error count;
InvocationsPerInstance is 1 / the instances behind the variant; latencies are
microseconds, published as distributions so percentiles work. OverheadLatency
is ContainerLatency − ModelLatency, so it exists only where the container's
front was seen (the proxy), never from a hook alone.
"""

from __future__ import annotations

from typing import NamedTuple

from agent.model import RequestRecord

INVOCATION_METRICS = ("Invocations", "Invocation4XXErrors", "Invocation5XXErrors",
                      "InvocationsPerInstance", "ModelLatency", "OverheadLatency",
                      "ContainerLatency")
LATENCIES = frozenset({"ModelLatency", "OverheadLatency", "ContainerLatency"})


class InvocationFigure(NamedTuple):
    metric: str
    value: float
    unit: str
    distribution: bool


def invocation_figures(record: RequestRecord, instance_count: int) -> list[InvocationFigure]:
    """The figures one request contributes."""
    status = record.status
    out = [
        InvocationFigure("Invocations", 1.0, "None", False),
        InvocationFigure("Invocation4XXErrors", 1.0 if 400 <= status < 500 else 0.0, "None", False),
        InvocationFigure("Invocation5XXErrors", 1.0 if status >= 500 else 0.0, "None", False),
        InvocationFigure("InvocationsPerInstance", 1.0 / instance_count, "None", False),
        InvocationFigure("ModelLatency", _us(record.model_us), "Microseconds", True),
    ]
    if record.container_us is not None:
        container = _us(record.container_us)
        out.append(InvocationFigure("ContainerLatency", container, "Microseconds", True))
        out.append(InvocationFigure("OverheadLatency", max(0.0, container - _us(record.model_us)),
                                    "Microseconds", True))
    return out


def _us(value: float) -> float:
    """Whole microseconds: CloudWatch shows no finer, and equal values share a bucket."""
    return float(round(value))
