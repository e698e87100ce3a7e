"""StatsD parsing: every form we accept, and no input that makes it raise."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.rules.statsd import Sample, parse_datagram, parse_line


def test_forms() -> None:
    assert parse_line("hits:3|c") == Sample("hits", 3.0, "c", "Count", 1.0, ())
    assert parse_line("lat:12.5|ms|@0.1|#b:2,a:1") == Sample(
        "lat", 12.5, "d", "Milliseconds", 0.1, (("a", "1"), ("b", "2")))
    assert parse_line("temp:-4|g|#flag") == Sample("temp", -4.0, "g", "None", 1.0,
                                                   (("flag", "true"),))
    assert parse_line("size:10|h").kind == "d"  # type: ignore[union-attr]


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
