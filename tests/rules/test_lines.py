"""Log framing: lines, multi-line events, UTF-8-safe splitting (with hypothesis properties)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import LogEvent
from agent.rules.lines import (
    MAX_EVENT_BYTES,
    TRACEBACK_JOIN_MS,
    EventJoiner,
    LineFramer,
    Piece,
    split_utf8,
    to_messages,
)


def frame(chunks: list[bytes], limit: int = MAX_EVENT_BYTES,
          pattern: re.Pattern[str] | None = None,
          times: list[int] | None = None) -> list[LogEvent]:
    """Run bytes through framer and joiner as the child-output source does; chunk i
    arrives at `times[i]` ms (default i)."""
    framer, joiner = LineFramer(limit), EventJoiner("stdout", pattern, limit)
    events: list[LogEvent] = []
    for i, chunk in enumerate(chunks):
        ts = times[i] if times is not None else i
        for piece in framer.feed(chunk, ts):
            events.extend(joiner.add(piece))
    for piece in framer.flush():
        events.extend(joiner.add(piece))
    return events + joiner.flush()


class TestFramer:
    def test_lines_and_partial_tail(self) -> None:
        """Complete lines come out at once; the tail waits for its newline or EOF."""
        framer = LineFramer()
        assert [p.data for p in framer.feed(b"a\nbc", 1)] == [b"a"]
        assert [p.data for p in framer.feed(b"d\ne", 2)] == [b"bcd"]
        assert [(p.data, p.complete) for p in framer.flush()] == [(b"e", False)]

    def test_partial_line_keeps_first_arrival_time(self) -> None:
        """A line's timestamp is the arrival of its first byte."""
        framer = LineFramer()
        framer.feed(b"hel", 100)
        assert framer.feed(b"lo\n", 200)[0].timestamp_ms == 100

    def test_long_line_without_newline_is_bounded(self) -> None:
        """A line longer than the limit is emitted in pieces before its newline arrives."""
        framer = LineFramer(limit=10)
        pieces = framer.feed(b"x" * 35, 1)
        assert [len(p.data) for p in pieces] == [10, 10, 10]
        assert not any(p.complete for p in pieces)

    def test_split_never_cuts_a_character(self) -> None:
        """Cuts fall on UTF-8 boundaries."""
        text = ("é€😀" * 20).encode()
        for piece in split_utf8(text, 7):
            piece.decode("utf-8")  # raises if cut mid-character
        assert b"".join(split_utf8(text, 7)) == text

    @given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=20),
           st.integers(4, 40))
    @settings(max_examples=300, deadline=None)
    def test_no_byte_lost_or_reordered(self, data: bytes, cuts: list[int], limit: int) -> None:
        """Whatever the chunking and limit, pieces + their newlines rebuild the input exactly."""
        chunks, rest = [], data
        for cut in cuts:
            chunks.append(rest[:cut])
            rest = rest[cut:]
        chunks.append(rest)
        framer = LineFramer(limit)
        pieces: list[Piece] = []
        for ts, chunk in enumerate(chunks):
            pieces += framer.feed(chunk, ts)
        pieces += framer.flush()
        rebuilt = b"".join(p.data + (b"\n" if p.complete else b"") for p in pieces)
        assert rebuilt == data
        assert all(len(p.data) <= limit for p in pieces)


class TestMessages:
    def test_invalid_utf8_replaced(self) -> None:
        """Invalid bytes become U+FFFD; the size counts the replacement's 3 bytes."""
        assert to_messages(b"ok\xff\xfe") == [("ok\ufffd\ufffd", 8)]

    def test_replacement_growth_split_again(self) -> None:
        """Invalid bytes can triple a piece's size; it is split to stay within the limit."""
        messages = to_messages(b"\xff" * 10, limit=9)
        assert all(size <= 9 for _, size in messages)
        assert "".join(m for m, _ in messages) == "\ufffd" * 10

    def test_crlf_trimmed(self) -> None:
        """A CRLF line loses its carriage return."""
        assert to_messages(b"windows\r") == [("windows", 7)]


class TestJoiner:
    def test_one_event_per_line_and_empty_lines_skipped(self) -> None:
        """Plain lines are events of their own; empty lines make no event."""
        assert [e.message for e in frame([b"a\n\nb\n\n"])] == ["a", "b"]

    def test_indented_lines_join(self) -> None:
        """Lines starting with whitespace join the previous event."""
        events = frame([b"error:\n  detail 1\n\tdetail 2\nnext\n"])
        assert [e.message for e in events] == ["error:\n  detail 1\n\tdetail 2", "next"]

    def test_python_traceback_is_one_event(self) -> None:
        """A traceback, its exception line and chained tracebacks are one event."""
        text = (b"before\nTraceback (most recent call last):\n  File \"m.py\", line 3, in f\n"
                b"    1/0\nZeroDivisionError: division by zero\n\n"
                b"During handling of the above exception, another exception occurred:\n\n"
                b"Traceback (most recent call last):\n  File \"m.py\", line 5\n"
                b"ValueError: bad\nafter\n")
        messages = [e.message for e in frame([text], times=[0])]
        assert messages[-1] == "after"
        assert len(messages) == 2
        assert messages[0].startswith("before\nTraceback")
        assert messages[0].endswith("ValueError: bad")
        assert "ZeroDivisionError" in messages[0]

    def test_header_and_its_traceback_are_one_event(self) -> None:
        """logger.exception's message (or gunicorn's header) and the traceback written with
        it arrive together: one event that starts with the header."""
        text = (b"[2024-05-01 10:00:00 +0000] [7] [ERROR] Error handling request /invocations\n"
                b"Traceback (most recent call last):\n  File \"app.py\", line 9, in handle\n"
                b"    raise ValueError(\"bad\")\nValueError: bad\n"
                b"ERROR in app: Exception on /invocations [POST]\n"
                b"Traceback (most recent call last):\n  File \"app.py\", line 3\n"
                b"KeyError: 'x'\nnext\n")
        messages = [e.message for e in frame([text], times=[0])]
        assert len(messages) == 3, messages
        assert messages[0].startswith("[2024-05-01 10:00:00 +0000] [7] [ERROR] Error handling")
        assert messages[0].endswith("ValueError: bad") and "Traceback" in messages[0]
        assert messages[1].startswith("ERROR in app: Exception on /invocations [POST]\n"
                                      "Traceback (most recent call last):")
        assert messages[1].endswith("KeyError: 'x'")
        assert messages[2] == "next"

    def test_header_in_an_earlier_read_within_the_window_joins(self) -> None:
        """Header and traceback written separately (print, then traceback.print_exc) and
        read apart, a few ms apart: still one event."""
        chunks = [b"failed to load\n", b"Traceback (most recent call last):\n  x\nE: y\n"]
        events = frame(chunks, times=[100, 100 + TRACEBACK_JOIN_MS])
        assert [e.message for e in events] == [
            "failed to load\nTraceback (most recent call last):\n  x\nE: y"]
        assert events[0].timestamp_ms == 100

    def test_line_long_before_a_traceback_stays_apart(self) -> None:
        """A line that came well before the traceback is not its header."""
        chunks = [b"server started\n", b"Traceback (most recent call last):\n  x\nE: y\n"]
        events = frame(chunks, times=[100, 101 + TRACEBACK_JOIN_MS])
        assert [e.message for e in events] == [
            "server started", "Traceback (most recent call last):\n  x\nE: y"]

    def test_two_tracebacks_in_a_row_stay_two_events(self) -> None:
        """A traceback never joins an event that holds a traceback already."""
        tb = b"Traceback (most recent call last):\n  x\nE: y\n"
        events = frame([b"head\n" + tb + tb], times=[0])
        assert [e.message for e in events] == [
            "head\n" + tb.decode().rstrip("\n"), tb.decode().rstrip("\n")]

    def test_header_and_traceback_over_the_limit_are_cut(self) -> None:
        """When header + traceback would outgrow the limit, the traceback starts its own."""
        events = frame([b"h" * 20 + b"\nTraceback (most recent call last):\n"], limit=40,
                       times=[0])
        assert [e.message for e in events] == ["h" * 20, "Traceback (most recent call last):"]

    def test_start_pattern(self) -> None:
        """With a start pattern, only matching lines start events."""
        pattern = re.compile(r"\d{4}-\d\d-\d\d ")
        events = frame([b"2024-01-01 a\nmore\n2024-01-02 b\n"], pattern=pattern)
        assert [e.message for e in events] == ["2024-01-01 a\nmore", "2024-01-02 b"]

    def test_event_size_counts_joined_bytes(self) -> None:
        """An event's size is its encoded length, newlines included."""
        event = frame(["é\n  ü\n".encode()])[0]
        assert event.size == len(event.message.encode()) == 7

    def test_joined_event_never_exceeds_limit(self) -> None:
        """An event that would outgrow the limit is cut at a line boundary."""
        events = frame([b"head\n" + b"  xxxxxxxx\n" * 10], limit=32)
        assert all(e.size <= 32 for e in events)
        assert "".join(e.message.replace("\n", "") for e in events) == "head" + "  xxxxxxxx" * 10

    def test_long_line_arrives_whole_across_events(self) -> None:
        """A line over the limit is split into events that concatenate to the line."""
        line = "ä" * 100
        events = frame([line.encode() + b"\n"], limit=15)
        assert "".join(e.message for e in events) == line
        assert all(e.size <= 15 for e in events)

    @given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                                   blacklist_categories=("Cs",)), max_size=30),
                    max_size=30),
           st.lists(st.integers(1, 40), max_size=10), st.integers(4, 64))
    @settings(max_examples=300, deadline=None)
    def test_valid_utf8_text_kept_in_order(self, lines: list[str], cuts: list[int],
                                           limit: int) -> None:
        """No character of valid UTF-8 input is lost or reordered, whatever the chunking."""
        data = "\n".join(lines).encode()
        chunks, rest = [], data
        for cut in cuts:
            chunks.append(rest[:cut])
            rest = rest[cut:]
        chunks.append(rest)
        events = frame(chunks, limit=limit)
        assert "".join(e.message.replace("\n", "") for e in events) == "".join(lines)
        assert all(0 < e.size <= limit for e in events)
        assert all(e.size == len(e.message.encode()) for e in events)


def frame_fast(chunks: list[bytes], limit: int,
               times: list[int] | None = None) -> list[LogEvent]:
    """Frame as the child-output source does: the fast path where it applies."""
    framer, joiner = LineFramer(limit), EventJoiner("stdout", None, limit)
    events: list[LogEvent] = []
    for i, chunk in enumerate(chunks):
        ts = times[i] if times is not None else i
        fast = framer.feed_lines(chunk, ts)
        if fast is not None:
            events.extend(joiner.add_lines(fast[1], fast[0], ts))
        else:
            for piece in framer.feed(chunk, ts):
                events.extend(joiner.add(piece))
    for piece in framer.flush():
        events.extend(joiner.add(piece))
    return events + joiner.flush()


_LINE_KINDS = st.sampled_from([
    b"plain", b"  indented", b"\tTabbed", b"", b"Traceback (most recent call last):",
    b"ValueError: x", b"During handling of the above exception, another exception occurred:",
    b"The above exception was the direct cause of the following exception:", b"bad \xff utf8",
    b"crlf\r", "\u00e9t\u00e9 \U0001f600".encode(), b"x" * 70, b"Tail", b"Done"])


class TestFastPath:
    @given(st.lists(_LINE_KINDS, max_size=40), st.lists(st.integers(1, 90), max_size=12),
           st.integers(8, 200))
    @settings(max_examples=400, deadline=None)
    def test_fast_path_equals_general_path(self, lines: list[bytes], cuts: list[int],
                                           limit: int) -> None:
        """The fast path yields exactly the events of the general path."""
        data = b"\n".join(lines)
        chunks, rest = [], data
        for cut in cuts:
            chunks.append(rest[:cut])
            rest = rest[cut:]
        chunks.append(rest)
        assert frame_fast(chunks, limit) == frame(chunks, limit)

    @given(st.lists(_LINE_KINDS, max_size=40), st.lists(st.integers(1, 90), max_size=12),
           st.lists(st.integers(0, 3 * TRACEBACK_JOIN_MS), min_size=13, max_size=13),
           st.integers(8, 200))
    @settings(max_examples=400, deadline=None)
    def test_fast_path_equals_general_path_at_any_pace(self, lines: list[bytes],
                                                       cuts: list[int], gaps: list[int],
                                                       limit: int) -> None:
        """With reads some ms apart (tracebacks joining their header or not), the fast
        path still yields exactly the events of the general path."""
        data = b"\n".join(lines)
        chunks, rest = [], data
        for cut in cuts:
            chunks.append(rest[:cut])
            rest = rest[cut:]
        chunks.append(rest)
        times = [sum(gaps[: i + 1]) for i in range(len(chunks))]
        assert frame_fast(chunks, limit, times) == frame(chunks, limit, times=times)


_TB = "Traceback (most recent call last):"
_TEXT_KINDS = st.sampled_from([
    "plain", "  indented", "\tTabbed", "", _TB, _TB, "ValueError: x",
    "During handling of the above exception, another exception occurred:",
    "ERROR in app: Exception on /invocations [POST]", "\u00e9t\u00e9 \U0001f600", "x" * 70,
    "Tail", "Done"])


class TestTracebackHeader:
    @given(st.lists(st.tuples(st.lists(_TEXT_KINDS, min_size=1, max_size=6),
                              st.integers(0, 3 * TRACEBACK_JOIN_MS)), max_size=15),
           st.integers(72, 300), st.booleans())
    @settings(max_examples=400, deadline=None)
    def test_nothing_lost_and_tracebacks_join_their_header(
            self, reads: list[tuple[list[str], int]], limit: int, fast: bool) -> None:
        """Reads of whole lines, some ms apart: the events hold every non-empty line once,
        in order, within the limit; and a traceback starts an event of its own only when
        the line before it came more than TRACEBACK_JOIN_MS earlier, or its event already
        holds a traceback, or joining would outgrow the limit."""
        chunks, times, arrived, now = [], [], [], 0
        for lines, gap in reads:
            now += gap
            chunks.append("".join(line + "\n" for line in lines).encode())
            times.append(now)
            arrived += [(line, now) for line in lines if line]
        events = frame_fast(chunks, limit, times) if fast else frame(chunks, limit, times=times)
        split = [e.message.split("\n") for e in events]
        assert [line for lines in split for line in lines] == [line for line, _ in arrived]
        assert all(0 < e.size <= limit and e.size == len(e.message.encode()) for e in events)
        position = 0
        for i, lines in enumerate(split):
            if i > 0 and lines[0] == _TB:
                previous, gap = split[i - 1], arrived[position][1] - arrived[position - 1][1]
                assert (gap > TRACEBACK_JOIN_MS or _TB in previous
                        or events[i - 1].size + 1 + len(_TB) > limit), (previous, gap)
            position += len(lines)
