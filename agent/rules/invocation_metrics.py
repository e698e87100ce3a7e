"""One request -> SageMaker's invocation metrics (docs/metrics.md), as pure figures.

Invocations is 1 per request; Invocation4XXErrors and Invocation5XXErrors are
1 or 0, so their Average is the error rate and their Sum the error count;
InvocationsPerInstance is 1 / the instances behind the variant; latencies are
microseconds, published as distributions so percentiles work. OverheadLatency
is ContainerLatency − ModelLatency, so it exists only where the container's
front was seen (the proxy), never from a hook alone. InvocationModelErrors is 1
for any answer but 2XX (the proxy's own 502/504 included; not a client's 499/408).

Streamed answers (chunked, or close-delimited `text/event-stream`, as
InvokeEndpointWithResponseStream gets them) add ModelTimeToFirstByte (request sent
to the model → first body byte back) and ModelInterChunkLatency (time between two
reads of the model's socket that carried body bytes), both µs distributions.

The rest are not per request: ConcurrentRequestsPerModel is sampled each second
(Minimum/Maximum/Average of requests in flight); a multi-model endpoint's loads
and unloads give ModelLoadingTime / ModelUnloadingTime (µs) and LoadedModelCount
(in the instance namespace, as SageMaker's `/aws/sagemaker/Endpoints` has it).
"""

from __future__ import annotations

from agent.model import RequestTally

INVOCATION_METRICS = ("Invocations", "Invocation4XXErrors", "Invocation5XXErrors",
                      "InvocationModelErrors", "InvocationsPerInstance", "ModelLatency",
                      "OverheadLatency", "ContainerLatency", "ModelTimeToFirstByte",
                      "ModelInterChunkLatency")
LATENCIES = frozenset({"ModelLatency", "OverheadLatency", "ContainerLatency",
                       "ModelTimeToFirstByte", "ModelInterChunkLatency"})
CONCURRENCY = "ConcurrentRequestsPerModel"
MODEL_LOADING, MODEL_UNLOADING = "ModelLoadingTime", "ModelUnloadingTime"
LOADED_MODELS = "LoadedModelCount"
# TargetModel / InferenceComponentName values beyond TELEMETRY_MAX_MODELS fold into this one.
OTHER_MODEL = "Other"


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
                           ("Invocation5XXErrors", tally.errors_5xx),
                           ("InvocationModelErrors", tally.model_errors)):
        out.append((metric, {1.0: errors, 0.0: n - errors}))
    out.append(("ModelLatency", tally.model))
    if tally.container:
        out.append(("ContainerLatency", tally.container))
        out.append(("OverheadLatency", tally.overhead))
    if tally.first_byte:
        out.append(("ModelTimeToFirstByte", tally.first_byte))
    if tally.inter_chunk:
        out.append(("ModelInterChunkLatency", tally.inter_chunk))
    return out


def concurrency_figures(low: int, high: int, mean: float, span: float
                        ) -> list[tuple[float, float]]:
    """One sampled span (a second, or the part of one before a stop) of requests in flight
    as (value, weight) figures for one statistic: the span's time-weighted mean weighs its
    length in seconds, so SampleCount is the seconds sampled, Sum the request-seconds and
    Average exactly the mean in flight over the interval; the lowest and highest counts
    reached weigh 0 (they set Minimum and Maximum only)."""
    return [(mean, span), (float(low), 0.0), (float(high), 0.0)]
