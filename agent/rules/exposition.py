"""One Prometheus page from two: the model server's own `/metrics`, then the agent's.

SageMaker's collector scrapes `/metrics` on port 8080, the proxy's port, so the
proxy serves both pages as one. Rules, all pure:

- **Format.** The page served is Prometheus text 0.0.4 (what the agent writes and
  what every scraper reads). The upstream is asked for it (`ACCEPT`; no
  `application/openmetrics-text` in it, since prometheus_client servers answer
  OpenMetrics whenever that string appears at all). An upstream that answers
  OpenMetrics anyway is converted to 0.0.4 with prometheus_client (exemplars
  dropped, `_created` samples become their own gauges, as client_python does), up
  to `MAX_OPENMETRICS_BYTES`. Any other content type is refused.
- **Families by line.** Family names come from `# HELP`/`# TYPE` lines and
  sample names, one pass over the lines with a sample regex (no float parsing),
  as Prometheus' own text parser groups them: a sample belongs to the family
  above it when its name is the family's (or `_bucket`/`_sum`/`_count` of a
  histogram or summary), else it starts an untyped family. The upstream's lines
  are passed through as they came, once checked.
- **No duplicate family.** The upstream keeps its names (they are the model
  server's, and dashboards use them). An agent family whose names (family name,
  sample names, histogram/summary suffixes) meet any upstream name is renamed
  `telemetry_agent_<name>`, and listed in `Merge.renamed` so the caller warns;
  if even that name is taken it is dropped (`Merge.dropped`).
- **Refuse rather than break.** An upstream page that is not valid UTF-8, has a
  line that is neither a comment nor a sample, or a TYPE of no 0.0.4 kind is left
  out whole (`Merge.refused` says why): one bad line would make the scraper
  reject the agent's families too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ACCEPT = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"
AGENT_PREFIX = "telemetry_agent_"
OPENMETRICS = "application/openmetrics-text"
# prometheus_client's OpenMetrics parser converts about 1.3 MB/s of CPU (text 0.0.4 is checked
# at about 18 MB/s): a larger OpenMetrics page is refused rather than take seconds per scrape.
MAX_OPENMETRICS_BYTES = 1 << 20

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
# name, optional {labels} (quoted values may hold braces, escaped quotes), value, optional
# timestamp. The value is only checked for shape: Go's ParseFloat is the scraper's judge.
# Possessive quantifiers and no two adjacent runs of the same characters: linear time on
# any line (a line of a million blanks must not take forever).
_SAMPLE = re.compile(
    r'([a-zA-Z_:][a-zA-Z0-9_:]*+)(?:[ \t]*+\{(?:[^"{}]|"(?:[^"\\]|\\.)*+")*+\})?[ \t]++'
    r"[-+]?(?:(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][-+]?[0-9]++)?|[Ii]nf|NaN|nan)"
    r"(?:[ \t]++-?[0-9]++)?[ \t]*+\Z")
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


class Refused(ValueError):
    """The page cannot be merged safely; the message says why."""


@dataclass(slots=True)
class Family:
    """One metric family: its name, type, every name it uses, and its lines in order."""

    name: str
    type: str = "untyped"
    samples: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)

    def owns(self, sample: str) -> bool:
        """Whether a sample line named `sample` belongs to this family (as Prometheus' text
        parser decides)."""
        return sample == self.name or sample in self._suffixed()

    def names(self) -> set[str]:
        """Every series name this family puts on a page (reserved against collisions)."""
        return {self.name, *self.samples, *self._suffixed()}

    def _suffixed(self) -> tuple[str, ...]:
        return tuple(self.name + s for s in _SUFFIXES.get(self.type, ()))


@dataclass(frozen=True, slots=True)
class Merge:
    """The page to serve, and what the caller should count and warn about."""

    page: bytes
    upstream: bool  # the upstream's page is in `page`
    renamed: tuple[str, ...] = ()  # agent families served as `prefix + name`
    dropped: tuple[str, ...] = ()  # agent families left out: even the prefixed name was taken
    refused: str | None = None  # why the upstream's page was left out


def families(text: str) -> list[Family]:
    """Split a text-0.0.4 page into families, in page order.

    Raises:
        Refused: a line is neither a comment nor a sample, or a TYPE is unknown.
    """
    out: list[Family] = []
    current: Family | None = None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if line[0] == "#":
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not _NAME.match(name):
                    raise Refused(f"line {number}: bad metric name in {parts[1]}")
                if current is None or current.name != name:
                    current = Family(name)
                    out.append(current)
                if parts[1] == "TYPE":
                    kind = parts[3].strip() if len(parts) > 3 else ""
                    if kind not in _TYPES:
                        raise Refused(f"line {number}: TYPE {kind[:40]!r} is not text 0.0.4")
                    current.type = kind
            elif current is None:
                current = Family("")  # a leading free comment: kept, owns no sample
                out.append(current)
            current.lines.append(line)
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise Refused(f"line {number} is neither a comment nor a sample")
        sample = match.group(1)
        if current is None or not current.owns(sample):
            current = Family(sample)
            out.append(current)
        current.samples.add(sample)
        current.lines.append(line)
    return out


def to_text(body: bytes, content_type: str) -> str:
    """The upstream's answer as text 0.0.4 (OpenMetrics converted).

    Raises:
        Refused: not UTF-8, not an exposition, or OpenMetrics that does not parse.
    """
    kind = content_type.split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"not UTF-8 at byte {exc.start}") from None
    if kind == OPENMETRICS:
        if len(body) > MAX_OPENMETRICS_BYTES:
            raise Refused(f"OpenMetrics page over {MAX_OPENMETRICS_BYTES} bytes (text 0.0.4 "
                          "may be larger)")
        return _openmetrics_to_text(text)
    if kind not in ("text/plain", ""):
        raise Refused(f"content type {kind[:60]!r} is not a Prometheus exposition")
    return text


def merge_pages(agent: bytes, upstream: bytes | None, content_type: str = "",
                prefix: str = AGENT_PREFIX) -> Merge:
    """The upstream's page (when given and valid) followed by the agent's families, no
    family name twice. Never raises: a page that cannot be used is left out, with why."""
    if upstream is None:
        return Merge(agent, upstream=False)
    try:
        text = to_text(upstream, content_type)
        taken = _names(families(text))
    except Refused as exc:
        return Merge(agent, upstream=False, refused=str(exc))
    if not text.strip():
        return Merge(agent, upstream=True)  # a model server with no metrics (yet)
    out = [text if text.endswith("\n") else text + "\n"]
    renamed: list[str] = []
    dropped: list[str] = []
    for family in families(agent.decode("utf-8", errors="replace")):
        names = family.names()
        if family.name and names & taken:
            original, family = family.name, _prefixed(family, prefix)
            names = family.names()
            if names & taken:
                dropped.append(original)
                continue
            renamed.append(original)
        taken |= names
        out.extend(line + "\n" for line in family.lines)
    return Merge("".join(out).encode("utf-8"), upstream=True, renamed=tuple(renamed),
                 dropped=tuple(dropped))


def _names(found: Iterable[Family]) -> set[str]:
    taken: set[str] = set()
    for family in found:
        taken |= family.names()
    taken.discard("")
    return taken


def _prefixed(family: Family, prefix: str) -> Family:
    """The same family under `prefix + name`: its HELP/TYPE lines and sample lines."""
    lines = []
    for line in family.lines:
        if line[0] == "#":
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[1] in ("HELP", "TYPE"):
                line = f"# {parts[1]} {prefix}{parts[2]}"
        else:
            line = prefix + line
        lines.append(line)
    return Family(prefix + family.name, family.type, {prefix + s for s in family.samples},
                  lines)


class _Collected:
    """A registry stand-in for `generate_latest`: yields parsed families."""

    def __init__(self, found: list[object]) -> None:
        self._found = found

    def collect(self) -> list[object]:
        return self._found


def _openmetrics_to_text(text: str) -> str:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    try:
        found = list(text_string_to_metric_families(text))
        return generate_latest(_Collected(found)).decode("utf-8")  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the parser raises several kinds
        raise Refused(f"OpenMetrics page does not parse: {str(exc)[:120]}") from None
