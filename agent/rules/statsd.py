"""StatsD / DogStatsD lines -> samples (pure, fuzzed by the tests).

Accepted: `name:value|type[|@rate][|#tag:v,tag2:v2]`, several lines per datagram
separated by newlines, types c (counter), g (gauge), ms / h / d (timer,
histogram, distribution: all kept as distributions). Anything else is
counted as malformed and skipped: a bad line never stops the others.

A gauge value with a sign (`+3`, `-2`) changes the gauge by that much, as in
StatsD (`Sample.delta`); to set a negative gauge, set it to 0 first. A sample
rate (`@0.1`) scales counters (value / rate) and weighs timer values (each
stands for 1 / rate samples); gauges ignore it.

The hooks speak the same language. `sagemaker.invocation:<model ms>|ms|#status:<code>`
(optionally `container_ms:<ms>`) is one whole /invocations request; the
SageMaker names (`ModelLatency`, `Invocations`, ...) in milliseconds or counts
map onto the invocation metrics; every other name is a custom metric. A
latency name (`ModelLatency`, ...) takes timer values only (`|ms`, `|h` or `|d`)
and all three are read as milliseconds, the unit StatsD timers and the hooks use:
`ModelLatency:12|d` is 12 ms like `ModelLatency:12|ms` (`latency_us`).

The hooks send their per-process tally in a compact form of that line, several
values like DogStatsD's `name:v1:v2|ms`, each value one or more requests:

    sagemaker.invocation:<item>[:<item>...]|ms|#status:<code>
    item = <model ms>[/<container ms>][*<count>]        e.g. 12.5*3:13.001/15.2

`parse_invocations` turns such a line back into one `RequestRecord` per request
(`split_datagram` routes it), so counts and latency distributions stay exact. A
line with any bad item is malformed as a whole.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from agent.model import RequestRecord
from agent.rules.validation import MAX_VALUE

INVOCATION = "sagemaker.invocation"
MAX_RECORDS = 1_000_000  # requests one compact line may stand for
MAX_NAME = 255
MAX_TAGS = 10  # CloudWatch allows 30 dimensions; keep custom metrics far below
# RequestRecord's fields after the first three, at their defaults (a plain invocation).
_RECORD_DEFAULTS = tuple(RequestRecord._field_defaults[f] for f in RequestRecord._fields[3:])
_TYPES = {"c": ("c", "Count"), "g": ("g", "None"), "ms": ("d", "Milliseconds"),
          "h": ("d", "None"), "d": ("d", "None")}


class Sample(NamedTuple):
    """One parsed StatsD line. `kind`: "c" counter, "g" gauge, "d" distribution."""

    name: str
    value: float
    kind: str
    unit: str
    rate: float
    tags: tuple[tuple[str, str], ...]
    delta: bool = False  # a gauge given as +N / -N: a change, not a new value


def parse_datagram(data: bytes) -> tuple[list[Sample], int]:
    """(samples, malformed line count) for one datagram; each line stands alone."""
    samples, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            sample = parse_line(raw.decode("utf-8"))
        except UnicodeDecodeError:
            sample = None
        if sample is None:
            bad += 1
        else:
            samples.append(sample)
    return samples, bad


def split_datagram(data: bytes) -> tuple[list[Sample], list[RequestRecord], int]:
    """(samples, requests, malformed line count) for one datagram: compact hook lines
    (several values, `/` or `*`) become request records, every other line a sample."""
    samples: list[Sample] = []
    records: list[RequestRecord] = []
    bad = 0
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
            continue
        if _is_compact(line):
            parsed = parse_invocations(line)
            if parsed is None:
                bad += 1
            else:
                records += parsed
            continue
        sample = parse_line(line)
        if sample is None:
            bad += 1
        else:
            samples.append(sample)
    return samples, records, bad


def _is_compact(line: str) -> bool:
    line = line.lstrip()
    if not line.startswith(INVOCATION + ":"):
        return False
    value = line[len(INVOCATION) + 1:].partition("|")[0]
    return ":" in value or "/" in value or "*" in value


def parse_invocations(line: str) -> list[RequestRecord] | None:
    """A compact hook line as one record per request, or None when it is malformed."""
    name, _, rest = line.strip().partition(":")
    if name != INVOCATION:
        return None
    values, _, meta = rest.partition("|")
    parts = meta.split("|")
    if parts[0] != "ms":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        if not part.startswith("#"):  # a sampled (@rate) tally could not be exact
            return None
        parsed = _tags(part[1:])
        if parsed is None:
            return None
        tags.update(parsed)
    try:
        status = int(tags.get("status", "200"))
        default_container = float(tags["container_ms"]) if "container_ms" in tags else None
    except ValueError:
        return None
    if not 100 <= status <= 599:
        return None
    default_us = None if default_container is None else default_container * 1000.0
    if default_us is not None and not 0.0 <= default_us <= MAX_VALUE:
        return None
    make = tuple.__new__  # RequestRecord(...) costs twice as much: this runs per request
    records: list[RequestRecord] = []
    append = records.append
    for item in values.split(":"):
        count = 1
        if "*" in item:
            item, _, times = item.partition("*")
            try:
                count = int(times)
            except ValueError:
                return None
            if count < 1 or len(records) + count > MAX_RECORDS:
                return None
        try:
            if "/" in item:
                model_text, _, container_text = item.partition("/")
                model = float(model_text) * 1000.0
                container = float(container_text) * 1000.0
                if not 0.0 <= container <= MAX_VALUE:
                    return None
            else:
                model = float(item) * 1000.0
                container = default_us
        except ValueError:
            return None
        if not 0.0 <= model <= MAX_VALUE:
            return None
        one = make(RequestRecord, (status, container, model, *_RECORD_DEFAULTS))
        if count == 1:
            append(one)
        else:
            records += [one] * count
    if len(records) > MAX_RECORDS:
        return None
    return records


def parse_line(line: str) -> Sample | None:
    """One StatsD line, or None when it is malformed."""
    name, sep, rest = line.strip().partition(":")
    if not sep or not name or len(name) > MAX_NAME or not name.isprintable():
        return None
    parts = rest.split("|")
    if len(parts) < 2:
        return None
    if parts[1] not in _TYPES:
        return None
    kind, unit = _TYPES[parts[1]]
    text = parts[0]
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    delta = kind == "g" and text[:1] in ("+", "-")
    rate, tags = 1.0, ()
    for part in parts[2:]:
        if part.startswith("@"):
            try:
                rate = float(part[1:])
            except ValueError:
                return None
            if not 0 < rate <= 1:
                return None
        elif part.startswith("#"):
            tags = _tags(part[1:])
            if tags is None:
                return None
    return Sample(name, value, kind, unit, rate, tags, delta)


def _tags(text: str) -> tuple[tuple[str, str], ...] | None:
    out = []
    for item in text.split(","):
        if not item:
            continue
        key, _, value = item.partition(":")
        if not key or len(key) > 255 or len(value) > 1024:
            return None
        out.append((key, value or "true"))
    if len(out) > MAX_TAGS:
        return None
    return tuple(sorted(out))


def latency_us(sample: Sample) -> float | None:
    """A sample for a SageMaker latency name (`ModelLatency`, ...) in microseconds, or None
    when it is not a timer (`|c`, `|g`: not a latency). `|ms`, `|h` and `|d` are all
    milliseconds: StatsD timers are, the hooks send milliseconds, and a client library's
    `distribution` or `histogram` of a latency means the same figure."""
    if sample.kind != "d":
        return None
    return sample.value * 1000.0


def invocation_record(sample: Sample) -> RequestRecord | None:
    """A `sagemaker.invocation` sample as a request record (None if its tags are wrong or a
    latency is negative or beyond what CloudWatch takes)."""
    tags = dict(sample.tags)
    try:
        status = int(tags.get("status", "200"))
        container = float(tags["container_ms"]) * 1000 if "container_ms" in tags else None
    except ValueError:
        return None
    model = sample.value * 1000
    if not 100 <= status <= 599 or not 0 <= model <= MAX_VALUE or (
            container is not None and not 0 <= container <= MAX_VALUE):
        return None
    return RequestRecord(status, container, model)
