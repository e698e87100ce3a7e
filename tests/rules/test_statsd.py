"""StatsD parsing: every form we accept, and no input that makes it raise."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.model import RequestRecord
from agent.rules.statsd import (
    MAX_RECORDS,
    Sample,
    invocation_record,
    latency_us,
    parse_datagram,
    parse_invocations,
    parse_line,
    split_datagram,
)


def test_forms() -> None:
    assert parse_line("hits:3|c") == Sample("hits", 3.0, "c", "Count", 1.0, ())
    assert parse_line("lat:12.5|ms|@0.1|#b:2,a:1") == Sample(
        "lat", 12.5, "d", "Milliseconds", 0.1, (("a", "1"), ("b", "2")))
    assert parse_line("temp:4|g|#flag") == Sample("temp", 4.0, "g", "None", 1.0,
                                                  (("flag", "true"),))
    assert parse_line("size:10|h").kind == "d"  # type: ignore[union-attr]


def test_signed_gauges_are_deltas() -> None:
    """`+N` / `-N` on a gauge change it (StatsD); a bare number sets it; counters and timers
    keep their sign as a plain value."""
    assert parse_line("temp:-4|g") == Sample("temp", -4.0, "g", "None", 1.0, (), delta=True)
    assert parse_line("temp:+2.5|g") == Sample("temp", 2.5, "g", "None", 1.0, (), delta=True)
    assert parse_line("temp:7|g").delta is False  # type: ignore[union-attr]
    assert parse_line("hits:-1|c").delta is False  # type: ignore[union-attr]


def test_latency_timers_are_milliseconds_whatever_the_type() -> None:
    """`ModelLatency:12|d` and `|h` are 12 ms like `|ms` (12,000 µs); a counter or gauge is
    not a latency."""
    for line in ("ModelLatency:12|ms", "ModelLatency:12|d", "ModelLatency:12|h"):
        sample = parse_line(line)
        assert sample is not None and latency_us(sample) == 12_000.0, line
    for line in ("ModelLatency:12|c", "ModelLatency:12|g"):
        sample = parse_line(line)
        assert sample is not None and latency_us(sample) is None, line


def test_invocations_beyond_cloudwatch_range_are_refused() -> None:
    """A request whose latency CloudWatch could not store is refused, not recorded."""
    for line in ("sagemaker.invocation:1e300|ms", "sagemaker.invocation:1|ms|#container_ms:1e300",
                 "sagemaker.invocation:1|ms|#container_ms:nan"):
        sample = parse_line(line)
        assert sample is not None and invocation_record(sample) is None, line
    ok = parse_line("sagemaker.invocation:2.5|ms|#status:404,container_ms:3")
    assert ok is not None and invocation_record(ok) == RequestRecord(404, 3000.0, 2500.0)
    assert parse_invocations("sagemaker.invocation:1:1e300|ms") is None
    assert parse_invocations("sagemaker.invocation:1/1e300|ms") is None
    assert parse_invocations("sagemaker.invocation:1|ms|#container_ms:1e300") is None


def test_malformed() -> None:
    for line in ("", "nocolon", ":1|c", "x:1", "x:abc|c", "x:1|q", "x:inf|g", "x:1|c|@2",
                 "x:1|c|@0", "x:1|c|#" + ",".join(f"t{i}:v" for i in range(11))):
        assert parse_line(line) is None, line


def test_one_bad_line_does_not_spoil_the_others() -> None:
    samples, bad = parse_datagram(b"a:1|c\n\xff\xff\nb:2|g\nbroken\n")
    assert [s.name for s in samples] == ["a", "b"] and bad == 2


@given(st.binary(max_size=2000))
def test_never_raises_on_any_bytes(data: bytes) -> None:
    samples, bad = parse_datagram(data)
    assert bad >= 0 and all(isinstance(s, Sample) for s in samples)


@given(st.text(max_size=300))
def test_never_raises_on_any_text(text: str) -> None:
    parse_line(text)


# -- the hooks' compact tally lines ----------------------------------------------------------


def test_compact_invocation_lines_expand_to_one_record_per_request() -> None:
    records = parse_invocations("sagemaker.invocation:12.5*3:13.001/15.2:0|ms|#status:503")
    assert records == [RequestRecord(503, None, 12_500.0)] * 3 + [
        RequestRecord(503, 15_200.0, 13_001.0), RequestRecord(503, None, 0.0)]
    # status defaults to 200; a container_ms tag applies to the items without their own
    assert parse_invocations("sagemaker.invocation:1:2/3|ms|#container_ms:9") == [
        RequestRecord(200, 9000.0, 1000.0), RequestRecord(200, 3000.0, 2000.0)]


def test_compact_invocation_lines_malformed_as_a_whole() -> None:
    for line in ("sagemaker.invocation:1:x|ms", "sagemaker.invocation:1*0|ms",
                 "sagemaker.invocation:1*-2|ms", "sagemaker.invocation:1*2.5|ms",
                 "sagemaker.invocation:-1:2|ms", "sagemaker.invocation:1/-2:2|ms",
                 "sagemaker.invocation:nan:1|ms", "sagemaker.invocation:1:inf|ms",
                 "sagemaker.invocation:1:2|c", "sagemaker.invocation:1:2|ms|@0.5",
                 "sagemaker.invocation:1:2|ms|#status:999", "sagemaker.invocation:1:2|ms|#status:x",
                 "sagemaker.invocation:1:|ms", "sagemaker.invocation:1/|ms",
                 f"sagemaker.invocation:1*{MAX_RECORDS}:2|ms", "other:1:2|ms"):
        assert parse_invocations(line) is None, line


def test_split_datagram_routes_compact_lines_to_records() -> None:
    samples, records, bad = split_datagram(
        b"sagemaker.invocation:5*2:6/7|ms|#status:404\n"
        b"sagemaker.invocation:8|ms|#status:200\n"  # the classic one-request form: a sample
        b"queue_depth:5|g\nsagemaker.invocation:1:zz|ms\n\xff\n")
    assert records == [RequestRecord(404, None, 5000.0)] * 2 + [RequestRecord(404, 7000.0, 6000.0)]
    assert [s.name for s in samples] == ["sagemaker.invocation", "queue_depth"]
    assert bad == 2


@given(st.text(max_size=300))
def test_compact_parser_never_raises(text: str) -> None:
    parse_invocations("sagemaker.invocation:" + text)
    split_datagram(("sagemaker.invocation:" + text).encode("utf-8", "surrogatepass"))
