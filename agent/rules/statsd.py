"""StatsD / DogStatsD lines -> samples (pure, fuzzed by the tests).

Accepted: `name:value|type[|@rate][|#tag:v,tag2:v2]`, several lines per datagram
separated by newlines, types c (counter), g (gauge), ms / h / d (timer,
histogram, distribution: all kept as distributions). Anything else is
counted as malformed and skipped: a bad line never stops the others.

The hooks speak the same language. `sagemaker.invocation:<model ms>|ms|#status:<code>`
(optionally `container_ms:<ms>`) is one whole /invocations request; the
SageMaker names (`ModelLatency`, `Invocations`, ...) in milliseconds or counts
map onto the invocation metrics; every other name is a custom metric.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from agent.model import RequestRecord

INVOCATION = "sagemaker.invocation"
MAX_NAME = 255
MAX_TAGS = 10  # CloudWatch allows 30 dimensions; keep custom metrics far below
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
    try:
        value = float(parts[0])
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
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
    return Sample(name, value, kind, unit, rate, tags)


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


def invocation_record(sample: Sample) -> RequestRecord | None:
    """A `sagemaker.invocation` sample as a request record (None if its tags are wrong)."""
    tags = dict(sample.tags)
    try:
        status = int(tags.get("status", "200"))
        container = float(tags["container_ms"]) * 1000 if "container_ms" in tags else None
    except ValueError:
        return None
    if not 100 <= status <= 599 or sample.value < 0 or (container is not None and container < 0):
        return None
    return RequestRecord(status, container, sample.value * 1000)
