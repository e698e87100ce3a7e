"""The outbox: memory bound, disk spool, drop-oldest, order, and restart pickup (real files)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sinks.outbox import Codec, Outbox

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
    box = make(tmp_path, spool_max=30)
    box.put(range(60))
    assert box.spool_bytes <= 30 and box.stats.dropped["spool_full"] > 0
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
