"""PutLogEvents packing: bytes with 26 B per event, 10,000 events, 24 h span, sorted."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import LogEvent
from agent.rules.batching import (
    LOG_BATCH_MAX_BYTES,
    LOG_BATCH_MAX_EVENTS,
    LOG_BATCH_MAX_SPAN_MS,
    log_batch_params,
    log_event_cost,
    take_log_batch,
)
from agent.rules.lines import MAX_EVENT_BYTES


def event(size: int, ts: int = 0) -> LogEvent:
    return LogEvent(ts, "x" * size, "stdout", size)


def batches(events: list[LogEvent]) -> list[list[LogEvent]]:
    out, rest = [], list(events)
    while rest:
        n = take_log_batch(rest)
        out.append(rest[:n])
        rest = rest[n:]
    return out


class TestTakeLogBatch:
    def test_bytes_count_26_per_event(self) -> None:
        """A batch fills to exactly 1,048,576 bytes counting 26 per event."""
        size = LOG_BATCH_MAX_BYTES // 4 - 26
        assert take_log_batch([event(size)] * 5) == 4

    def test_at_most_10000_events(self) -> None:
        """Tiny events stop at 10,000 per batch."""
        assert take_log_batch([event(1)] * 25_000) == LOG_BATCH_MAX_EVENTS

    def test_span_at_most_24h(self) -> None:
        """Events more than 24 h apart go to different batches."""
        events = [event(5, 0), event(5, LOG_BATCH_MAX_SPAN_MS), event(5, LOG_BATCH_MAX_SPAN_MS + 1)]
        assert take_log_batch(events) == 2

    def test_largest_event_fits_alone(self) -> None:
        """A maximal event is a batch of its own."""
        assert log_event_cost(event(MAX_EVENT_BYTES)) == LOG_BATCH_MAX_BYTES
        assert take_log_batch([event(MAX_EVENT_BYTES), event(1)]) == 1

    def test_params_sorted_stably(self) -> None:
        """Events are sorted by time; equal times keep arrival order."""
        events = [LogEvent(5, "b", "stderr", 1), LogEvent(3, "a", "stdout", 1),
                  LogEvent(5, "c", "stdout", 1)]
        params = log_batch_params("g", "s", events)
        assert [e["message"] for e in params["logEvents"]] == ["a", "b", "c"]  # type: ignore[index]

    @given(st.lists(st.tuples(st.integers(1, MAX_EVENT_BYTES),
                              st.integers(0, 3 * LOG_BATCH_MAX_SPAN_MS)), max_size=40))
    @settings(max_examples=200, deadline=None)
    def test_every_batch_within_limits(self, specs: list[tuple[int, int]]) -> None:
        """All batches respect every limit, and together hold every event in order."""
        events = [event(size, ts) for size, ts in specs]
        parts = batches(events)
        assert [e for part in parts for e in part] == events
        for part in parts:
            assert 1 <= len(part) <= LOG_BATCH_MAX_EVENTS
            assert sum(log_event_cost(e) for e in part) <= LOG_BATCH_MAX_BYTES
            stamps = [e.timestamp_ms for e in part]
            assert max(stamps) - min(stamps) <= LOG_BATCH_MAX_SPAN_MS


def test_full_batch_ends_on_a_millisecond_boundary_when_cheap() -> None:
    """A limit inside one millisecond moves the cut to its start (≤ 5 % of the batch), so
    consecutive batches share no timestamp and can be in flight together."""
    events = [event(100, ts=i // 100) for i in range(20_000)]  # 100 lines per ms
    cut = batches(events)
    sizes = [sum(log_event_cost(e) for e in b) for b in cut[:-1]]
    assert len(cut) == 3 and min(sizes) >= LOG_BATCH_MAX_BYTES * 0.95
    for left, right in zip(cut, cut[1:], strict=False):
        assert left[-1].timestamp_ms < right[0].timestamp_ms


def test_no_boundary_within_reach_keeps_the_full_cut() -> None:
    events = [event(100, ts=7) for _ in range(20_000)]  # one millisecond, over two batches
    assert take_log_batch(events) == 8322  # the byte limit: 1,048,576 // 126
