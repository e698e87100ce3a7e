"""Value types that flow from sources through aggregation to sinks.

They are small frozen dataclasses so they can cross threads and tasks safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple


class Resource(str, Enum):
    """The kind of SageMaker resource the container belongs to."""

    ENDPOINT = "endpoint"
    TRAINING = "training"
    TRANSFORM = "transform"
    PROCESSING = "processing"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this container is, as SageMaker names things.

    Attributes:
        resource: endpoint, training, transform or processing.
        endpoint_name: the endpoint (endpoint resource).
        variant_name: the production variant (endpoint resource).
        container_name: the pipeline container's ContainerHostname, or None.
        job_name: the training, transform or processing job.
        host: instance id (endpoint, transform), `algo-N` (training) or hostname.
        start_epoch: Unix seconds when the agent started (used in stream names).
    """

    resource: Resource
    endpoint_name: str
    variant_name: str
    container_name: str | None
    job_name: str
    host: str
    start_epoch: int


class LogEvent(NamedTuple):
    """One CloudWatch Logs event: a line, or several joined (a traceback).

    A NamedTuple rather than a frozen dataclass: one is built for every line a
    busy child prints, and a tuple is about 3x cheaper to create.

    Attributes:
        timestamp_ms: arrival time of the event's first line, ms since the epoch.
        message: valid UTF-8 text, at most `MAX_EVENT_BYTES` encoded.
        stream: "stdout" or "stderr", the child's stream it came from.
        size: encoded size of `message` in bytes, as PutLogEvents counts it
            (without its 26 B per-event overhead); kept so batching never re-encodes.
    """

    timestamp_ms: int
    message: str
    stream: str
    size: int
