"""Requests (proxy, hooks) and StatsD samples -> SageMaker's invocation metrics and custom ones.

A request costs a few dict updates here (`RequestTally`); the tallies become
statistics once per interval (`flush`, called by the publisher just before it
closes intervals), so the proxy and the hooks' 100,000 records a second stay cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.aggregation.aggregator import Aggregator
from agent.model import (
    INVOKE,
    LOAD,
    UNLOAD,
    Dimensions,
    Identity,
    MetricKey,
    RequestRecord,
    RequestTally,
    Resource,
)
from agent.rules import naming
from agent.rules.invocation_metrics import (
    CONCURRENCY,
    INVOCATION_METRICS,
    LATENCIES,
    LOADED_MODELS,
    MODEL_LOADING,
    MODEL_UNLOADING,
    OTHER_MODEL,
    concurrency_figures,
    invocation_counts,
)
from agent.rules.statsd import INVOCATION, Sample, invocation_record, latency_us
from agent.rules.validation import series_problem

Observer = Callable[[RequestRecord], None]
# (TargetModel, InferenceComponentName) of a tally; (None, None) for a plain /invocations.
Labels = tuple[str | None, str | None]
_PLAIN: Labels = (None, None)
MAX_LOADED_NAMES = 100_000  # model names remembered as loaded (LoadedModelCount)
MAX_CUSTOM_SERIES = 1000  # TELEMETRY_CUSTOM_SERIES' default
OVERFLOW = "CustomMetricsOverflow"  # where custom series beyond the cap are counted


class RequestMetrics:
    """Counts requests into per-interval tallies and StatsD samples into the aggregator.

    Args:
        aggregator: shared with the instance metrics (one publish per interval).
        identity: for dimensions.
        namespace: the configured root namespace.
        instance_count: instances behind the variant (InvocationsPerInstance).
        observers: also told of every counted request (the Prometheus histograms).
        proxy_on: the proxy counts requests; hook-reported requests are then ignored
            (counting both would double every figure).
        max_models: distinct TargetModel (and, apart, InferenceComponentName) values
            published; later ones are counted under `Other` (`models_folded`).
    """

    def __init__(self, aggregator: Aggregator, identity: Identity, *, namespace: str,
                 instance_count: int, observers: Sequence[Observer] = (),
                 proxy_on: bool, max_models: int = 100,
                 custom_series: int = MAX_CUSTOM_SERIES) -> None:
        self._aggregator = aggregator
        self._observers = tuple(observers)
        self._instances = instance_count
        self._namespace = naming.invocation_namespace(namespace)
        self._interval = aggregator.interval
        self._tallies: dict[int, dict[Labels, RequestTally]] = {}
        self._identity = identity
        self._max_models = max_models
        self._models: dict[str, str] = {}      # TargetModel -> its dimension value
        self._components: dict[str, str] = {}  # InferenceComponentName -> its value
        self._label_keys: dict[tuple[str, str | None, str | None], list[MetricKey]] = {}
        self._loaded: set[str] = set()          # model names loaded and not unloaded
        self._loaded_unnamed = 0                # loads whose body named no model
        self._mme = False                       # a load or unload was seen
        self._concurrency_keys = [MetricKey(self._namespace, CONCURRENCY, dims, "None")
                                  for dims in naming.invocation_dimension_sets(
                                      identity, CONCURRENCY)]
        self._model_call_keys = {
            kind: [MetricKey(self._namespace, name, dims, "Microseconds")
                   for dims in naming.invocation_dimension_sets(identity, name)]
            for kind, name in ((LOAD, MODEL_LOADING), (UNLOAD, MODEL_UNLOADING))}
        self._loaded_keys = [MetricKey(naming.instance_namespace(namespace, identity.resource),
                                       LOADED_MODELS, dims, "None")
                             for dims in naming.instance_dimension_sets(identity)]
        units = {m: "Microseconds" if m in LATENCIES else "None" for m in INVOCATION_METRICS}
        self._keys = {m: [MetricKey(self._namespace, m, dims, units[m])
                          for dims in naming.invocation_dimension_sets(identity, m)]
                      for m in INVOCATION_METRICS}
        self._custom_base: Dimensions = (
            naming.variant_dimensions(identity) if identity.resource is Resource.ENDPOINT
            else (("Host", naming.host_dimension(identity)),))
        # Custom series admitted in the interval starting at `_custom_start` (at most
        # `_custom_cap`), and the last value of gauges (for +N / -N), as many at most.
        self._custom_cap = custom_series
        self._custom: set[tuple[str, Dimensions]] = set()
        self._custom_start = -1
        self._gauges: dict[tuple[str, Dimensions], float] = {}
        self._overflow = MetricKey(self._namespace, OVERFLOW, self._custom_base, "Count")
        self._proxy_on = proxy_on
        self.requests = 0
        self.stats = {"hook_requests_ignored": 0, "custom_series_folded": 0,
                      "statsd_samples": 0, "statsd_invalid_invocations": 0}
        self.stats.update(models_folded=0, components_folded=0, model_loads=0,
                          model_load_failures=0, model_unloads=0, model_unload_failures=0,
                          model_loads_unnamed=0)

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, **self.stats}

    def _tally(self, labels: Labels = _PLAIN) -> RequestTally:
        start = int(time.time() // self._interval) * self._interval
        tallies = self._tallies.get(start)
        if tallies is None:
            tallies = self._tallies[start] = {}
        tally = tallies.get(labels)
        if tally is None:
            tally = tallies[labels] = RequestTally()
        return tally

    def _labels(self, record: RequestRecord) -> Labels:
        """The record's (TargetModel, InferenceComponentName), each bounded by max_models."""
        model, component = record.model, record.component
        if model is not None:
            model = self._bounded(self._models, model, "models_folded")
        if component is not None:
            component = self._bounded(self._components, component, "components_folded")
        return model, component

    def _bounded(self, known: dict[str, str], name: str, counter: str) -> str:
        value = known.get(name)
        if value is None:
            if len(known) >= self._max_models:
                self.stats[counter] += 1  # bounded cost: later names are counted as Other
                return OTHER_MODEL
            value = known[name] = name
        return value

    def on_record(self, record: RequestRecord) -> None:
        """One counted request (the proxy's, or a hook's when no proxy runs)."""
        if record.kind != INVOKE:
            self._model_call(record)
            return
        self.requests += 1
        if record.model is None and record.component is None:
            tally = self._tally()
        else:
            tally = self._tally(self._labels(record))
        tally.add(record.status, record.model_us, record.container_us)
        if record.first_byte_us is not None:
            tally.add_stream(record.first_byte_us, record.gaps_us)
        for observe in self._observers:
            observe(record)

    def _model_call(self, record: RequestRecord) -> None:
        """A multi-model endpoint's load or unload: its duration when it succeeded, and the
        models loaded (LoadedModelCount) from the answers' statuses."""
        ok = 200 <= record.status < 300
        load = record.kind == LOAD
        self.stats[("model_loads" if ok else "model_load_failures") if load else
                   ("model_unloads" if ok else "model_unload_failures")] += 1
        if not ok:
            return
        now = time.time()
        for key in self._model_call_keys[record.kind]:
            self._aggregator.add(key, record.model_us, now, distribution=True)
        self._mme = True
        name = record.model
        if load and name is not None and len(self._loaded) < MAX_LOADED_NAMES:
            self._loaded.add(name)
        elif load:  # named by no body (or past the bound): counted, not named
            self.stats["model_loads_unnamed"] += 1
            self._loaded_unnamed += 1
        elif name in self._loaded:
            self._loaded.discard(name)
        elif self._loaded_unnamed:
            self._loaded_unnamed -= 1
        for key in self._loaded_keys:  # Minimum and Maximum see every change
            self._aggregator.add(key, float(self.loaded_models), now, weight=0.0)

    @property
    def loaded_models(self) -> int:
        """Models loaded and not unloaded, as the answers to `/models` calls said."""
        return len(self._loaded) + self._loaded_unnamed

    def on_concurrency(self, low: int, high: int, mean: float, at: float,
                       span: float = 1.0) -> None:
        """A second (`span` s) of invocations in flight (the proxy's sampler), and the
        loaded models."""
        for key in self._concurrency_keys:
            for value, weight in concurrency_figures(low, high, mean, span):
                self._aggregator.add(key, value, at, weight=weight)
        if self._mme:
            for key in self._loaded_keys:
                self._aggregator.add(key, float(self.loaded_models), at)

    def on_records(self, records: list[RequestRecord]) -> None:
        """Requests from a hook's compact tally (one datagram, one interval)."""
        if self._proxy_on:
            self.stats["hook_requests_ignored"] += len(records)
            return
        self.requests += len(records)
        add = self._tally().add
        for record in records:
            add(record.status, record.model_us, record.container_us)  # hooks: /invocations
        for observe in self._observers:
            for record in records:
                observe(record)

    def flush(self) -> None:
        """Move the tallied requests into the aggregator (before it closes intervals)."""
        tallies, self._tallies = self._tallies, {}
        for start, by_labels in tallies.items():
            for (model, component), tally in by_labels.items():
                self._aggregator.merge(start, [
                    (key, counted, metric in LATENCIES)
                    for metric, counted in invocation_counts(tally, self._instances)
                    for key in self._metric_keys(metric, model, component)])

    def _metric_keys(self, metric: str, model: str | None, component: str | None
                     ) -> list[MetricKey]:
        """The keys of `metric`: the endpoint's, plus a named model's or component's."""
        if model is None and component is None:
            return self._keys[metric]
        keys = self._label_keys.get((metric, model, component))
        if keys is None:
            unit = self._keys[metric][0].unit if self._keys[metric] else (
                "Microseconds" if metric in LATENCIES else "None")
            keys = self._label_keys[(metric, model, component)] = [
                *self._keys[metric],
                *(MetricKey(self._namespace, metric, dims, unit)
                  for dims in naming.model_dimension_sets(self._identity, metric, model,
                                                          component))]
        return keys

    def on_samples(self, samples: list[Sample]) -> None:
        """StatsD samples from UDP or the hook socket."""
        self.stats["statsd_samples"] += len(samples)
        now = time.time()
        for sample in samples:
            if sample.name == INVOCATION:
                record = invocation_record(sample)
                if record is None:
                    self.stats["statsd_invalid_invocations"] += 1
                elif self._proxy_on:
                    self.stats["hook_requests_ignored"] += 1
                else:
                    self.on_record(record)
            elif sample.name in self._keys:
                self._sagemaker_metric(sample, now)
            else:
                self._custom_metric(sample, now)

    def _sagemaker_metric(self, sample: Sample, now: float) -> None:
        """A StatsD line with one of SageMaker's names: a latency takes timers only, read as
        milliseconds (`latency_us`); a count takes the value (scaled by the sample rate)."""
        keys = self._keys[sample.name]
        if sample.name in LATENCIES:
            value = latency_us(sample)
            if value is None:
                self._aggregator.rejected.note("latency_not_timer", keys[0], sample.value, now)
                return
            for key in keys:
                self._aggregator.add(key, value, now, distribution=True, weight=1 / sample.rate)
            return
        for key in keys:
            self._aggregator.add(key, sample.value / sample.rate, now)

    def _custom_metric(self, sample: Sample, now: float) -> None:
        """A custom metric: checked at the door, then counted in its series while fewer than
        `custom_series` distinct series (name x dimensions) were seen this interval; every
        later new series only adds 1 to `CustomMetricsOverflow`. Memory stays bounded by the
        cap however many names arrive."""
        dims: Dimensions = self._custom_base + sample.tags
        start = int(now // self._interval) * self._interval
        if start != self._custom_start:
            self._custom_start, self._custom = start, set()
        series = (sample.name, dims)
        admitted = series in self._custom  # then checked already, when it was admitted
        if not admitted:
            problem = series_problem(sample.name, dims)
            if problem is not None:
                self._aggregator.rejected.note(problem, MetricKey(
                    self._namespace, sample.name, dims, sample.unit), sample.value, now)
                return
            if len(self._custom) >= self._custom_cap:
                self.stats["custom_series_folded"] += 1
                self._aggregator.add(self._overflow, 1.0, now, custom=True)
                return
        key = MetricKey(self._namespace, sample.name, dims, sample.unit)
        value = sample.value
        if sample.kind == "c":
            value /= sample.rate
        elif sample.kind == "g" and sample.delta:
            value += self._gauges.get(series, 0.0)
        weight = 1 / sample.rate if sample.kind == "d" else 1.0
        if not self._aggregator.add(key, value, now, distribution=sample.kind == "d",
                                    weight=weight, custom=True):
            return
        if not admitted:
            self._custom.add(series)
        if sample.kind == "g":
            self._remember_gauge(series, value)

    def _remember_gauge(self, series: tuple[str, Dimensions], value: float) -> None:
        """Keep a gauge's last value for later +N / -N lines, for at most `custom_series`
        gauges (the least recently set is forgotten first: its next delta starts from 0)."""
        gauges = self._gauges
        gauges.pop(series, None)
        if len(gauges) >= max(self._custom_cap, 1):
            del gauges[next(iter(gauges))]
        gauges[series] = value
