"""The outbox: memory bound, disk spool, drop-oldest, order, and restart pickup (real files)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DeliveryError
from agent.model import LogEvent
from agent.rules.batching import take_log_batch
from agent.sinks import outbox as outbox_module
from agent.sinks.cloudwatch_logs import LOG_CODEC
from agent.sinks.cloudwatch_metrics import METRIC_CODEC
from agent.sinks.delivery import BatchSender
from agent.sinks.outbox import (
    MAGIC,
    VERSION,
    Codec,
    CorruptSegment,
    Outbox,
    UnsafeFile,
    decode_segment,
    frame,
    quarantine,
    read_segment,
)

T = TypeVar("T")

CODEC: Codec[int] = Codec(lambda items: json.dumps(items).encode(), lambda data: json.loads(data))


def make(tmp_path: Path | None, max_bytes: int = 100, spool_max: int = 10_000) -> Outbox[int]:
    """Items are ints costing 10 bytes; batches are up to 3 items."""
    def cut(items: Sequence[int]) -> int:
        return min(3, len(items))

    return Outbox("t", max_bytes=max_bytes, cost=lambda _: 10, cut=cut, codec=CODEC,
                  spool=tmp_path / "spool" if tmp_path else None, spool_max_bytes=spool_max)


def drain(box: Outbox[int]) -> list[int]:
    out: list[int] = []
    while (batch := box.take()) is not None:
        out += batch.items
        box.done(batch)
    return out


def test_memory_only_drops_oldest_and_counts() -> None:
    box = make(None)
    box.put(range(25))
    assert box.memory_bytes <= 100 and box.stats.dropped["overflow"] == 15
    assert drain(box) == list(range(15, 25))


def test_spills_to_disk_in_order_and_deletes_delivered_segments(tmp_path: Path) -> None:
    box = make(tmp_path)
    box.put(range(40))
    assert box.memory_bytes <= 100 and box.spool_bytes > 0 and box.stats.spilled_items > 0
    assert box.stats.dropped["overflow"] == 0
    assert drain(box) == list(range(40))
    assert not list((tmp_path / "spool").iterdir())


def test_given_back_batch_comes_first(tmp_path: Path) -> None:
    box = make(tmp_path)
    box.put(range(5))
    batch = box.take()
    assert batch is not None and batch.items == [0, 1, 2]
    box.put(range(5, 30))  # spills while a batch is in flight
    box.give_back(batch)
    assert drain(box) == list(range(30))


def test_batches_in_flight_together_come_back_in_order(tmp_path: Path) -> None:
    box = make(tmp_path)
    box.put(range(9))
    first, second, third = box.take(), box.take(), box.take()
    assert first and second and third and box.pending_items == 9
    box.done(second)
    box.give_back(third)
    box.give_back(first)
    assert drain(box) == [0, 1, 2, 6, 7, 8]


def test_spool_bound_drops_oldest_segments(tmp_path: Path) -> None:
    box = make(tmp_path, spool_max=100)  # two or three segments of ~36 bytes
    box.put(range(60))
    assert box.spool_bytes <= 100 and box.stats.dropped["spool_full"] > 0
    delivered = drain(box)
    assert delivered == list(range(60))[60 - len(delivered):]
    assert len(delivered) + box.stats.dropped["spool_full"] == 60


def test_persist_and_restart_keep_order(tmp_path: Path) -> None:
    box = make(tmp_path)
    box.put(range(20))
    batch = box.take()
    assert batch is not None and batch.items == [0, 1, 2]
    assert box.persist() == 20  # the batch in flight is kept too
    again = make(tmp_path)
    assert again.stats.restored_items == 20 and again.pending_items == 20
    again.put([20, 21])
    assert drain(again) == list(range(22))


def test_persist_returns_with_the_spool_as_counted_while_the_worker_lags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown with two background writes finished but not yet applied: applying the
    second puts the spool over its bound and evicts the first. That unlink must be done
    when `persist` returns its count, however slow the worker thread is (here it is held
    until the end), or the next agent delivers items counted as dropped (or finds the file
    gone between its scan and its read). Every item is dropped or kept, never both."""
    gate = threading.Event()
    real_unlink = outbox_module._unlink

    def unlink(path: Path) -> None:
        if threading.current_thread().name.startswith("spool-"):
            gate.wait(30)  # the worker is slow: nothing it is handed now runs before the end
        real_unlink(path)

    monkeypatch.setattr(outbox_module, "_unlink", unlink)
    spool = tmp_path / "spool"

    async def main() -> tuple[int, int, list[str]]:
        box = make(tmp_path, spool_max=50)  # one segment of ~35 bytes fits, two do not
        box.put(range(11))  # two batches spill on the worker; no yield, so none is applied
        assert box.stats.spilled_items == 6 and box.spool_bytes == 0
        kept = box.persist()
        return kept, box.stats.dropped["spool_full"], sorted(p.name for p in spool.glob("*.seg"))

    try:
        kept, dropped, files = asyncio.run(main())
    finally:
        gate.set()
    assert kept + dropped == 11 and dropped >= 3  # the first batch was evicted
    assert sum(int(name.removesuffix(".seg").split("-")[1]) for name in files) == kept, files
    again = make(tmp_path, spool_max=1 << 20)
    assert again.stats.restored_items == kept
    assert drain(again) == list(range(11 - kept, 11))
    assert again.stats.spool_errors == 0


def test_unwritable_spool_falls_back_to_dropping(tmp_path: Path) -> None:
    box = make(tmp_path)
    os.chmod(tmp_path / "spool", 0o500)
    try:
        if os.access(tmp_path / "spool", os.W_OK):  # root ignores modes
            (tmp_path / "spool").rmdir()
            (tmp_path / "spool").write_text("not a directory")
        box.put(range(30))
    finally:
        os.chmod(tmp_path / "spool", 0o700)
    assert box.stats.spool_errors >= 1 and box.stats.dropped["overflow"] == 20
    assert drain(box) == list(range(20, 30))


def test_corrupt_segment_is_counted_and_skipped(tmp_path: Path) -> None:
    box = make(tmp_path)
    box.put(range(40))
    first = sorted((tmp_path / "spool").iterdir())[0]
    first.write_bytes(b"\xff not json")
    delivered = drain(box)
    lost = box.stats.dropped["spool_corrupt"]
    assert lost == 3 and delivered == [i for i in range(40) if i not in (0, 1, 2)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 4)), max_size=30))
def test_nothing_lost_or_repeated_under_any_interleaving(steps: list[tuple[int, int]]) -> None:
    """Puts, several batches in flight, some failing and coming back: every item is delivered
    exactly once, each batch is a run of consecutive items, and a batch that came back is
    the next one out."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        box = make(Path(tmp))
        sent, batches, n = [], [], 0
        for count, takes in steps:
            box.put(range(n, n + count))
            sent += range(n, n + count)
            n += count
            taken = [b for b in (box.take() for _ in range(takes)) if b is not None]
            failed = [b for i, b in enumerate(taken) if i % 2]
            for batch in taken:
                if batch in failed:
                    box.give_back(batch)
                else:
                    batches.append(batch.items)
                    box.done(batch)
            if failed:
                again = box.take()
                assert again is not None and again.items == failed[0].items
                box.give_back(again)
        while (batch := box.take()) is not None:
            batches.append(batch.items)
            box.done(batch)
        assert sorted(x for b in batches for x in b) == sent
        assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)


# -- a spool that verifies itself ----------------------------------------------------------------

def log_events(count: int, start: int = 0) -> list[LogEvent]:
    now = int(time.time() * 1000)
    return [LogEvent(now + i, f"line {i}", "stdout", len(f"line {i}"))
            for i in range(start, start + count)]


def log_box(spool: Path) -> Outbox[LogEvent]:
    """The logs sink's outbox as the agent builds it: real codec, real batching."""
    return Outbox("logs", max_bytes=1 << 20, cost=lambda e: e.size + 160, cut=take_log_batch,
                  codec=LOG_CODEC, spool=spool, spool_max_bytes=1 << 30)


def write_segments(spool: Path, batches: list[list[LogEvent]]) -> list[Path]:
    """One real segment per batch, as a stopping agent leaves them (oldest first)."""
    box = log_box(spool)
    for batch in batches:
        box.put(batch)
        taken = box.take()  # one batch each: persisted as its own segment
        assert taken is not None and taken.items == batch
    assert box.persist() == sum(len(b) for b in batches)
    return sorted(spool.glob("*.seg"))


def drain_batches(box: Outbox[T]) -> list[list[T]]:
    out = []
    while (batch := box.take()) is not None:
        out.append(batch.items)
        box.done(batch)
    return out


POISON = [b"123", b'[[1,"stdout",5]]', b'[[1,"stdout"]]', b'{"a":1}', b"[]",
          b'[[1e20,"stdout","x"]]', b'[[-1,"stdout","x"]]', b'[[1,"stdin","x"]]',
          b'[[1,"stdout","\\ud800"]]', b"[" * 100_000, b"\xff\xfe", b""]


@pytest.mark.parametrize("poison", POISON, ids=lambda p: repr(p[:20]))
@pytest.mark.parametrize("framed", [True, False], ids=["framed", "legacy"])
def test_wrong_shape_segment_is_quarantined_and_the_next_delivered(
        tmp_path: Path, poison: bytes, framed: bool) -> None:
    """A segment of valid framing (or the legacy bare JSON) but the wrong shape: never
    raises, is moved to quarantine/, counted, and the batches around it are delivered."""
    spool = tmp_path / "spool"
    first, bad, last = log_events(3), log_events(2, 10), log_events(4, 20)
    paths = write_segments(spool, [first, bad, last])
    paths[1].write_bytes(frame(poison, 2) if framed else poison)
    box = log_box(spool)
    assert drain_batches(box) == [first, last]
    assert box.stats.quarantined_segments == 1 and box.stats.dropped["spool_corrupt"] == 2
    assert [p.name.split("-", 1)[1] for p in (spool / "quarantine").iterdir()] == [paths[1].name]
    assert sorted(spool.glob("*.seg")) == []


def test_metrics_segment_with_overflowing_timestamp_is_quarantined(tmp_path: Path) -> None:
    """`{"$t": 1e20}` overflowed datetime and killed the metrics sender; now: quarantined."""
    spool = tmp_path / "metrics"
    box: Outbox[dict[str, Any]] = Outbox("metrics", max_bytes=1 << 20, cost=lambda _: 100,
                                         cut=lambda _: 1, codec=METRIC_CODEC, spool=spool,
                                         spool_max_bytes=1 << 30)
    good = {"Namespace": "n", "MetricData": [{"MetricName": "m", "Unit": "Count", "Value": 1.0,
                                              "Timestamp": datetime.now(UTC).replace(microsecond=0),
                                              "Dimensions": [{"Name": "Host", "Value": "h"}]}]}
    box.put([good, good])
    box.persist()
    first = sorted(spool.glob("*.seg"))[0]
    first.write_bytes(first.read_bytes().replace(b'"$t":', b'"$t":1e20,"x":'))
    again: Outbox[dict[str, Any]] = Outbox("metrics", max_bytes=1 << 20, cost=lambda _: 100,
                                           cut=lambda _: 1, codec=METRIC_CODEC, spool=spool,
                                           spool_max_bytes=1 << 30)
    assert drain_batches(again) == [[good]]
    assert again.stats.quarantined_segments == 1
    legacy = b'[{"Namespace":"n","MetricData":[{"MetricName":"m","Unit":"Count","Value":1,' \
             b'"Timestamp":{"$t":1e20}}]}]'
    with pytest.raises(CorruptSegment):
        METRIC_CODEC.decode(legacy)


def test_segments_are_framed_checksummed_and_durable(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment starts with the magic and version, its CRC covers every byte (one bit
    flipped anywhere is caught), and it is written via fsync + rename + fsync of the dir."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = tmp_path / "spool"
    [path] = write_segments(spool, [log_events(3)])
    assert False in synced and True in synced  # the file, then the folder
    data = path.read_bytes()
    assert data.startswith(MAGIC) and data[4] == VERSION
    assert not list(spool.glob("*.tmp"))
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptSegment):
            decode_segment(bytes(flipped), LOG_CODEC.decode, 3)
    assert decode_segment(data, LOG_CODEC.decode, 3) == (LOG_CODEC.decode(data[24:]), False)


def test_legacy_segment_from_the_previous_version_is_delivered(tmp_path: Path) -> None:
    """Bare JSON segments an older agent left are read (through the strict decode)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    events = log_events(3)
    (spool / f"{10**12:016d}-3.seg").write_bytes(LOG_CODEC.encode(events))
    box = log_box(spool)
    assert drain_batches(box) == [events] and box.stats.legacy_segments == 1


def test_leftover_temp_files_are_removed_when_the_spool_opens(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    events = log_events(3)
    [path] = write_segments(spool, [events])
    path.with_suffix(".tmp").write_bytes(b"half a segment")
    (spool / "0000000000000005-9.tmp").write_bytes(b"")
    box = log_box(spool)
    assert box.stats.temp_files_removed == 2 and not list(spool.glob("*.tmp"))
    assert drain_batches(box) == [events]


def test_symlinked_segment_is_never_read_or_followed(tmp_path: Path) -> None:
    """A .seg symlink (to a file that parses as a segment) is skipped, counted, left in
    place, and its target is neither read nor moved."""
    spool = tmp_path / "spool"
    [real] = write_segments(spool, [log_events(3)])
    target = tmp_path / "elsewhere.seg"
    target.write_bytes(real.read_bytes())
    real.unlink()
    link = spool / real.name
    link.symlink_to(target)
    box = log_box(spool)
    assert box.stats.skipped_files == 1 and drain_batches(box) == []
    assert link.is_symlink() and target.read_bytes().startswith(MAGIC)
    with pytest.raises(UnsafeFile):
        read_segment(link)  # and if one appears after the spool opened: O_NOFOLLOW


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_segment_owned_by_another_user_is_never_read(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first, other = log_events(3), log_events(2, 5)
    paths = write_segments(spool, [first, other])
    os.chown(paths[0], 12345, 12345)
    box = log_box(spool)
    assert box.stats.skipped_files == 1 and drain_batches(box) == [other]
    assert paths[0].exists()
    with pytest.raises(UnsafeFile):
        read_segment(paths[0])


def test_quarantine_is_bounded_oldest_removed(tmp_path: Path) -> None:
    folder = tmp_path / "quarantine"
    for i in range(8):
        bad = tmp_path / f"{i:016d}-1.seg"
        bad.write_bytes(b"x" * 100)
        assert quarantine(bad, folder, max_files=5, max_bytes=10_000)
    kept = sorted(p.name.split("-", 1)[1] for p in folder.iterdir())
    assert kept == [f"{i:016d}-1.seg" for i in range(3, 8)]
    big = tmp_path / f"{9:016d}-1.seg"
    big.write_bytes(b"x" * 20_000)
    quarantine(big, folder, max_files=5, max_bytes=10_000)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10_000 and not big.exists()


# -- off the event loop --------------------------------------------------------------------------

class RecordingSender(BatchSender[LogEvent]):
    """A sink whose service stores every batch it is sent, once `open` is set."""

    def __init__(self, outbox: Outbox[LogEvent]) -> None:
        super().__init__(outbox, parallel=2)
        self.sent: list[list[LogEvent]] = []
        self.open = asyncio.Event()

    async def send(self, batch: list[LogEvent], deadline: float) -> None:
        await self.open.wait()
        self.sent.append(batch)

    def dropped(self, batch: list[LogEvent], error: DeliveryError) -> None:
        raise AssertionError("nothing is refused here")


def test_sender_delivers_past_a_poisoned_segment_and_disk_io_leaves_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivery loop meets a wrong-shape segment between good ones: it quarantines it
    and delivers the rest and new items (spilled meanwhile), once each, in order; every
    spool read, write and fsync of the running loop happens on the outbox's worker
    thread, never on the loop's."""
    spool = tmp_path / "spool"
    batches = [log_events(3), log_events(2, 10), log_events(4, 20)]
    paths = write_segments(spool, batches)
    paths[1].write_bytes(b'[[1,"stdout",5]]')  # as the issue found it
    threads: list[str] = []
    real_read, real_write = outbox_module.read_segment, outbox_module.write_file

    def read(path: Path) -> bytes:
        threads.append(threading.current_thread().name)
        return real_read(path)

    def write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
        threads.append(threading.current_thread().name)
        real_write(path, data, sync_dir=sync_dir)

    monkeypatch.setattr(outbox_module, "read_segment", read)
    monkeypatch.setattr(outbox_module, "write_file", write)
    fresh = log_events(40, 100)

    async def main() -> RecordingSender:
        box = log_box(spool)
        box.max_bytes = 2_000  # about 12 events: the fresh ones spill while sends wait
        sender = RecordingSender(box)
        task = asyncio.create_task(sender.run())
        for start in range(0, len(fresh), 5):
            box.put(fresh[start:start + 5])
            sender.wake()
            await box.settle()
        assert box.stats.spilled_items >= 20 and box.stats.dropped["overflow"] == 0
        sender.open.set()
        sender.close(time.monotonic() + 10)
        await asyncio.wait_for(task, 10)
        assert box.persist() == 0  # shutdown: waits for the queued unlinks
        return sender

    sender = asyncio.run(main())
    delivered = [e for b in sender.sent for e in b]
    assert delivered == [*batches[0], *batches[2], *fresh]
    assert sender.outbox.stats.quarantined_segments == 1
    assert threads and all(name.startswith("spool-") for name in threads), threads
    assert not list(spool.glob("*.seg"))
