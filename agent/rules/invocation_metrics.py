"""One request -> SageMaker's invocation metrics (DESIGN §4), as pure figures.

Invocations is 1 per request; Invocation4XXErrors and Invocation5XXErrors are
1 or 0, so their Average is the error rate and their Sum the error count;
InvocationsPerInstance is 1 / the instances behind the variant; latencies are
microseconds, published as distributions so percentiles work. OverheadLatency
is ContainerLatency − ModelLatency, so it exists only where the container's
front was seen (the proxy), never from a hook alone.
"""

from __future__ import annotations

from agent.aggregate import RequestTally

INVOCATION_METRICS = ("Invocations", "Invocation4XXErrors", "Invocation5XXErrors",
                      "InvocationsPerInstance", "ModelLatency", "OverheadLatency",
                      "ContainerLatency")
LATENCIES = frozenset({"ModelLatency", "OverheadLatency", "ContainerLatency"})


Counted = dict[float, int] | tuple[float, float]


def invocation_counts(tally: RequestTally, instance_count: int) -> list[tuple[str, Counted]]:
    """An interval's tallied requests as (metric, counts): (value, times) for the
    per-request constants, value -> count maps for the 0/1 error figures and the
    latencies (whole microseconds)."""
    n = tally.requests
    if not n:
        return []
    out: list[tuple[str, Counted]] = [("Invocations", (1.0, n)),
                                      ("InvocationsPerInstance", (1.0 / instance_count, n))]
    for metric, errors in (("Invocation4XXErrors", tally.errors_4xx),
                           ("Invocation5XXErrors", tally.errors_5xx)):
        out.append((metric, {1.0: errors, 0.0: n - errors}))
    out.append(("ModelLatency", tally.model))
    if tally.container:
        out.append(("ContainerLatency", tally.container))
        out.append(("OverheadLatency", tally.overhead))
    return out
