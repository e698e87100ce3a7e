"""The middle stage: what sources emit becomes per-interval statistics for the sinks.

    sources/  -> records, samples, readings (agent.model types, by callback)
    aggregation/  -> `ClosedInterval`s of `Statistic`s per `MetricKey`
    sinks/    <- CloudWatch, Prometheus, file

Nothing here imports a source or a sink (the import-linter contracts say so);
`agent.app` wires the callbacks. Each part has `counters()` for self-telemetry.
"""
