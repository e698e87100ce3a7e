"""The spool against corrupted files: real segments written by the real codecs, then cut,
bit-flipped, or replaced by wrong shapes and huge numbers. The outbox never raises, every
intact batch comes out exactly once and in order, and every bad segment is quarantined
and counted. Also: the codecs' decode is total, and the outbox's bookkeeping holds with
its disk work on the worker thread under any interleaving."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import LogEvent
from agent.rules.batching import take_log_batch
from agent.sinks.cloudwatch_logs import LOG_CODEC
from agent.sinks.cloudwatch_metrics import METRIC_CODEC
from agent.sinks.outbox import (
    QUARANTINE,
    QUARANTINE_MAX_FILES,
    Codec,
    CorruptSegment,
    Outbox,
    decode_segment,
    frame,
)

T = TypeVar("T")
Request = dict[str, Any]
NOW_MS = int(time.time() * 1000)


def log_outbox(spool: Path) -> Outbox[LogEvent]:
    return Outbox("logs", max_bytes=1 << 30, cost=lambda e: e.size + 160, cut=take_log_batch,
                  codec=LOG_CODEC, spool=spool, spool_max_bytes=1 << 30)


def metric_outbox(spool: Path) -> Outbox[Request]:
    return Outbox("metrics", max_bytes=1 << 30, cost=lambda _: 100, cut=lambda _: 1,
                  codec=METRIC_CODEC, spool=spool, spool_max_bytes=1 << 30)


# -- real data -----------------------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40)


@st.composite
def log_batches(draw: st.DrawFn) -> list[list[LogEvent]]:
    """Batches of events as the child output source makes them (any Unicode text)."""
    out, ts = [], NOW_MS
    for _ in range(draw(st.integers(1, 6))):
        batch = []
        for msg in draw(st.lists(texts, min_size=1, max_size=5)):
            ts += draw(st.integers(0, 3))
            batch.append(LogEvent(ts, msg, draw(st.sampled_from(["stdout", "stderr"])),
                                  len(msg.encode())))
        out.append(batch)
    return out


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e100, max_value=1e100)


@st.composite
def metric_batches(draw: st.DrawFn) -> list[list[Request]]:
    """One PutMetricData request per batch, in the shapes `datums` writes."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        base = {"MetricName": draw(texts), "Unit": "Microseconds",
                "Timestamp": datetime.fromtimestamp(draw(st.integers(0, 2**33)), UTC),
                "Dimensions": [{"Name": draw(texts), "Value": draw(texts)}]}
        if draw(st.booleans()):
            values = draw(st.lists(finite, min_size=1, max_size=5))
            datum = {**base, "Values": values, "Counts": [1.0] * len(values)}
        else:
            datum = {**base, "StatisticValues": {"SampleCount": 1.0, "Sum": draw(finite),
                                                 "Minimum": draw(finite),
                                                 "Maximum": draw(finite)}}
        if draw(st.booleans()):
            datum["StorageResolution"] = 1
        out.append([{"Namespace": draw(texts), "MetricData": [datum]}])
    return out


def write_all(make: Callable[[Path], Outbox[T]], spool: Path, batches: list[list[T]]
              ) -> list[Path]:
    """Each batch as its own segment, oldest first, as a stopping agent leaves them."""
    box = make(spool)
    for batch in batches:
        box.put(batch)
        taken = box.take()
        assert taken is not None and taken.items == batch
    box.persist()
    paths = sorted(spool.glob("*.seg"))
    assert len(paths) == len(batches)
    return paths


# -- corruptions ---------------------------------------------------------------------------------

WRONG_SHAPES = [b"123", b"null", b'"text"', b"{}", b"[]", b"[1]", b'[[1,"stdout",5]]',
                b'[[1,"stdout"]]', b'[[true,"stdout","x"]]', b'[[1e20,"stdout","x"]]',
                b'[[1,"stdin","x"]]', b'[[1,"stdout","\\udc80"]]', b'[{"Namespace":1}]',
                b'[{"Namespace":"n","MetricData":[{"$t":1e20}]}]',
                b'[{"Namespace":"n","MetricData":[{"MetricName":"m","Unit":"None",'
                b'"Timestamp":{"$t":1e20},"Value":1}]}]',
                b'[{"Namespace":"n","MetricData":[{"MetricName":"m","Unit":"None",'
                b'"Timestamp":{"$t":1},"Value":1e400}]}]',
                b'[{"Namespace":"n","MetricData":[{"MetricName":"m","Unit":"None",'
                b'"Timestamp":{"$t":1},"Values":[1,2],"Counts":[1]}]}]',
                b"[" * 50_000, b"\xff\xfe\x00", b"NaN", b'[[' + b"9" * 5000 + b',"stdout","x"]]']


@st.composite
def corruption(draw: st.DrawFn, data: bytes, count: int) -> bytes:
    """A bad version of one segment's bytes: cut, one bit flipped, or a wrong payload
    (wrong shapes, huge numbers) inside a valid frame or as a legacy bare file."""
    kind = draw(st.sampled_from(["truncate", "flip", "shape", "bare", "number"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        bit = draw(st.integers(0, len(data) * 8 - 1))
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)
    if kind == "number":  # a real payload with one number made huge or non-finite
        payload = data[24:]
        huge = draw(st.sampled_from([b"1e20", b"1e400", b"-1", b"NaN", b"Infinity",
                                     b"9" * 400]))
        for anchor in (b'"$t":', b'[['):
            if anchor in payload:
                at = payload.index(anchor) + len(anchor)
                end = at
                while payload[end:end + 1] not in (b",", b"}", b"]"):
                    end += 1
                return frame(payload[:at] + huge + payload[end:], count)
        return frame(huge, count)
    shape = draw(st.sampled_from(WRONG_SHAPES))
    return frame(shape, count) if kind == "shape" else shape


def run_corrupted(make: Callable[[Path], Outbox[T]], batches: list[list[T]],
                  data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        paths = write_all(make, spool, batches)
        bad = data.draw(st.sets(st.integers(0, len(paths) - 1), max_size=len(paths)))
        for index in bad:
            raw = paths[index].read_bytes()
            paths[index].write_bytes(data.draw(corruption(raw, len(batches[index]))))
        box = make(spool)
        out = []
        while (batch := box.take()) is not None:  # never raises
            out.append(batch.items)
            box.done(batch)
        assert out == [b for i, b in enumerate(batches) if i not in bad]
        assert box.stats.quarantined_segments == len(bad)
        assert box.stats.dropped["spool_corrupt"] == sum(len(batches[i]) for i in bad)
        kept = list((spool / QUARANTINE).iterdir()) if bad else []
        assert len(kept) == min(len(bad), QUARANTINE_MAX_FILES)
        assert not list(spool.glob("*.seg")) and not list(spool.glob("*.tmp"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log_batches(), st.data())
def test_corrupted_log_segments_are_quarantined_and_the_rest_delivered_once(
        batches: list[list[LogEvent]], data: st.DataObject) -> None:
    run_corrupted(log_outbox, batches, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metric_batches(), st.data())
def test_corrupted_metric_segments_are_quarantined_and_the_rest_delivered_once(
        batches: list[list[Request]], data: st.DataObject) -> None:
    run_corrupted(metric_outbox, batches, data)


@pytest.mark.parametrize("make, batch", [
    (log_outbox, [LogEvent(NOW_MS, "héllo", "stdout", 6), LogEvent(NOW_MS + 1, "x", "stderr", 1)]),
    (metric_outbox, [{"Namespace": "SageMaker", "MetricData": [{
        "MetricName": "ModelLatency", "Unit": "Microseconds",
        "Timestamp": datetime.fromtimestamp(1_700_000_000, UTC),
        "Dimensions": [{"Name": "EndpointName", "Value": "e"}],
        "Values": [1.5, 2.0], "Counts": [3.0, 1.0]}]}]),
], ids=["logs", "metrics"])
def test_truncation_at_every_offset_is_caught(tmp_path: Path, make: Callable[[Path], Outbox[Any]],
                                              batch: list[Any]) -> None:
    """Cut a real segment at every offset: each is quarantined, the next one delivered."""
    spool = tmp_path / "spool"
    [path] = write_all(make, spool, [batch])
    data = path.read_bytes()
    for offset in range(len(data)):
        path.write_bytes(data[:offset])
        box = make(spool)
        assert box.take() is None, offset
        assert box.stats.quarantined_segments == 1
        assert not path.exists()
        path = spool / path.name
    assert len(list((spool / QUARANTINE).iterdir())) == QUARANTINE_MAX_FILES


# -- the codecs are total --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["$t", "Namespace", "MetricData", "MetricName", "Unit", "Timestamp",
                         "Value", "Values", "Counts", "StatisticValues", "Dimensions", "Name",
                         "StorageResolution", "SampleCount", "Sum", "Minimum", "Maximum", "x"]),
        inner, max_size=6),
    max_leaves=30)


@pytest.mark.parametrize("codec", [LOG_CODEC, METRIC_CODEC], ids=["logs", "metrics"])
@settings(max_examples=400, deadline=None)
@given(value=json_values, raw=st.binary(max_size=64))
def test_decode_is_total(codec: Codec[Any], value: object, raw: bytes) -> None:
    """Any JSON value, any bytes: decode returns a batch that encodes back to the same
    items, or raises CorruptSegment; never anything else."""
    for data in (json.dumps(value).encode(), raw):
        try:
            items = codec.decode(data)
        except CorruptSegment:
            continue
        assert codec.decode(codec.encode(items)) == items
        payload, _ = decode_segment(frame(codec.encode(items), len(items)), codec.decode,
                                    len(items))
        assert payload == items


# -- the worker thread's bookkeeping -----------------------------------------------------------

@pytest.mark.parametrize("spool_max", [1 << 20, 120], ids=["roomy", "evicting"])
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 4), st.integers(0, 3)),
                max_size=25))
def test_background_io_loses_nothing_under_any_interleaving(
        spool_max: int, steps: list[tuple[int, int, int]]) -> None:
    """As the delivery loop uses it (disk work on the worker, prefetch before take, batches
    taken while their segment is still being written, given back, persisted): every item
    is delivered exactly once, kept in the spool, or counted as dropped for the spool's
    bound (oldest segments deleted: "evicting"), never lost otherwise or repeated (once the
    worker is a bound behind, spills are written inline); memory stays within its bound
    plus what waits for the disk."""
    codec: Codec[int] = Codec(lambda items: json.dumps(items).encode(),
                              lambda data: json.loads(data))

    def cut(items: Sequence[int]) -> int:
        return min(3, len(items))

    async def main(spool: Path) -> tuple[list[int], int, int]:
        box = Outbox("t", max_bytes=100, cost=lambda _: 10, cut=cut, codec=codec, spool=spool,
                     spool_max_bytes=spool_max)
        delivered, n = [], 0
        for count, takes, settle in steps:
            box.put(range(n, n + count))
            n += count
            assert box.memory_bytes <= 100 + 100 + 30 * 10
            if settle & 1:
                await box.prefetch(2)
            taken = [b for b in (box.take() for _ in range(takes)) if b is not None]
            for i, batch in enumerate(taken):
                if i % 2:
                    box.give_back(batch)
                else:
                    delivered += batch.items
                    box.done(batch)
            if settle & 2:
                await box.settle()
            await asyncio.sleep(0)
        assert box.stats.dropped["overflow"] == box.stats.dropped["spool_corrupt"] == 0
        if n % 2:  # stop now: the rest goes to the spool
            kept = box.persist()
            return delivered, kept, box.stats.dropped["spool_full"]
        while True:
            await box.prefetch(2)
            if (batch := box.take()) is None:
                break
            delivered += batch.items
            box.done(batch)
        kept = box.persist()
        return delivered, kept, box.stats.dropped["spool_full"]

    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        delivered, kept, dropped = asyncio.run(main(spool))
        total = sum(count for count, _, _ in steps)
        again = Outbox("t", max_bytes=1 << 20, cost=lambda _: 10, cut=cut, codec=codec,
                       spool=spool, spool_max_bytes=1 << 20)
        rest = []
        while (batch := again.take()) is not None:
            rest += batch.items
            again.done(batch)
        assert len(rest) == kept - again.stats.dropped["spool_full"]
        out = delivered + rest
        assert len(set(out)) == len(out) == total - dropped - again.stats.dropped["spool_full"]
        assert set(out) <= set(range(total))
        assert dropped == 0 or spool_max < 1 << 20
        assert not list(spool.glob("*.seg"))
