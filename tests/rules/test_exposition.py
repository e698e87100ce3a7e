"""Merging the model server's Prometheus page with the agent's (pure rules, real promtool)."""

from __future__ import annotations

import re
import subprocess
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client import generate_latest as text_page
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_page

from agent.rules.exposition import AGENT_PREFIX, families, merge_pages

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OM = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TYPE_LINE = re.compile(r"^# TYPE (\S+) ", re.MULTILINE)


def promtool(page: bytes, lint: bool = True) -> None:
    """The real promtool parses the page (exit 1 when it cannot); with `lint`, it also has
    no finding at all (exit 3 is lint only: names the test chose on purpose)."""
    check = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True,
                           check=False)
    output = check.stdout + check.stderr
    if lint:
        assert check.returncode == 0, output
    else:
        assert check.returncode in (0, 3) and b"parsing error" not in output, output


def agent_page() -> bytes:
    registry = CollectorRegistry()
    Gauge("sagemaker_agent_cpu_usage_cores", "CPU", ["view"], registry=registry).labels(
        "container").set(0.5)
    Histogram("sagemaker_agent_model_latency_seconds", "latency", registry=registry).observe(0.2)
    Counter("agent_log_events_sent", "sent", registry=registry).inc(3)
    return text_page(registry)


def model_page(fmt: str = "text") -> bytes:
    registry = CollectorRegistry()
    Counter("vllm_prompt_tokens", "tokens", ["model_name"], registry=registry).labels(
        'm{"x"}').inc(5)
    Histogram("vllm_e2e_request_latency_seconds", "e2e", registry=registry).observe(1.5)
    return (text_page if fmt == "text" else openmetrics_page)(registry)


class TestMerge:
    def test_no_upstream_page_is_the_agents_alone(self) -> None:
        """Without an upstream page the agent's page is served unchanged."""
        agent = agent_page()
        merge = merge_pages(agent, None)
        assert merge.page == agent and not merge.upstream

    def test_upstream_first_verbatim_then_agent(self) -> None:
        """The upstream's bytes come first, as they were; the agent's families follow."""
        agent, model = agent_page(), model_page()
        merge = merge_pages(agent, model, TEXT)
        assert merge.upstream and merge.renamed == () and merge.refused is None
        assert merge.page == model + agent
        promtool(merge.page)

    def test_openmetrics_upstream_is_converted(self) -> None:
        """An OpenMetrics answer becomes text 0.0.4: no # EOF, counters as `_total`."""
        merge = merge_pages(agent_page(), model_page("openmetrics"), OM)
        assert merge.upstream, merge.refused
        assert b"# EOF" not in merge.page
        assert b'vllm_prompt_tokens_total{model_name="m{\\"x\\"}"} 5.0' in merge.page
        promtool(merge.page)

    def test_clashing_agent_family_is_prefixed(self) -> None:
        """A family name on both pages: the model keeps it, the agent's gets the prefix."""
        upstream = (b"# HELP agent_log_events_sent_total the model's\n"
                    b"# TYPE agent_log_events_sent_total counter\n"
                    b"agent_log_events_sent_total 9\n")
        merge = merge_pages(agent_page(), upstream, TEXT)
        assert merge.renamed == ("agent_log_events_sent_total",)
        assert b"\nagent_log_events_sent_total 9\n" in merge.page
        assert b"\ntelemetry_agent_agent_log_events_sent_total 3.0\n" in merge.page
        assert b"# TYPE telemetry_agent_agent_log_events_sent_total counter\n" in merge.page
        promtool(merge.page)

    def test_histogram_series_names_clash_too(self) -> None:
        """A family whose samples would take another's series names (a gauge named like a
        histogram's `_count`) counts as a clash."""
        upstream = (b"# TYPE sagemaker_agent_model_latency_seconds_count gauge\n"
                    b"sagemaker_agent_model_latency_seconds_count 1\n")
        merge = merge_pages(agent_page(), upstream, TEXT)
        assert merge.renamed == ("sagemaker_agent_model_latency_seconds",)
        promtool(merge.page, lint=False)  # the upstream's gauge named `_count` is a lint finding

    def test_family_still_clashing_when_prefixed_is_dropped(self) -> None:
        """When even the prefixed name is taken, the agent's family is left out, listed."""
        upstream = (b"# HELP agent_log_events_sent_total h\n"
                    b"# TYPE agent_log_events_sent_total counter\nagent_log_events_sent_total 1\n"
                    b"# HELP telemetry_agent_agent_log_events_sent_total h\n"
                    b"# TYPE telemetry_agent_agent_log_events_sent_total counter\n"
                    b"telemetry_agent_agent_log_events_sent_total 2\n")
        merge = merge_pages(agent_page(), upstream, TEXT)
        assert merge.dropped == ("agent_log_events_sent_total",) and merge.renamed == ()
        assert merge.page.count(b"# TYPE telemetry_agent_agent_log_events_sent_total") == 1
        promtool(merge.page)

    def test_untyped_samples_without_comments(self) -> None:
        """Bare sample lines (no HELP/TYPE) are families too, with labels and timestamps."""
        upstream = b'up 1\nrequests{path="/a b}"} 3 1700000000000\nrequests{path="/c"} 4\n'
        assert [f.name for f in families(upstream.decode())] == ["up", "requests"]
        merge = merge_pages(agent_page(), upstream, TEXT)
        assert merge.page.startswith(upstream)
        promtool(merge.page, lint=False)  # no HELP: a lint finding only

    def test_unusable_upstream_pages_are_refused_whole(self) -> None:
        """Not an exposition, not UTF-8, a line that is no sample, an OpenMetrics-only type,
        OpenMetrics without `# EOF` or over 1 MiB: the agent's page alone, with the reason."""
        cases = [(b"<html>hi</html>", "text/html"), (b"x 1\n\xff 2\n", TEXT),
                 (b"x 1\nthis is not a sample\n", TEXT), (b"# TYPE x info\nx_info 1\n", TEXT),
                 (b"x{a=\"1\" 1\n", TEXT), (b"# TYPE x gauge\nx 1\n", OM),
                 (b"# TYPE x gauge\n" + b"x 1\n" * 300_000 + b"# EOF\n", OM)]
        agent = agent_page()
        for body, ctype in cases:
            merge = merge_pages(agent, body, ctype)
            assert merge.page == agent and not merge.upstream, body
            assert merge.refused, body

    def test_hostile_lines_are_refused_in_linear_time(self) -> None:
        """Megabyte lines of blanks, digits or open quotes are refused fast, not backtracked
        over for minutes."""
        agent = agent_page()
        for line in (b"x" + b" " * 1_000_000 + b"!", b"x 1" + b" " * 1_000_000 + b"z",
                     b"x " + b"1" * 1_000_000 + b"x", b'x{a="' + b"\\" * 500_000,
                     b"x{" + b" " * 1_000_000 + b"1"):
            started = time.process_time()
            merge = merge_pages(agent, line + b"\n", TEXT)
            assert merge.refused and time.process_time() - started < 1.0


_NAMES = st.sampled_from(["a", "a_total", "a_count", "b", "b_bucket", "c_sum", "agent_x",
                          "telemetry_agent_a"])


def _registry(draw_kinds: list[tuple[str, str]]) -> bytes:
    registry = CollectorRegistry()
    for name, kind in draw_kinds:
        try:
            if kind == "counter":
                Counter(name, "h", ["l"], registry=registry).labels('v"}\\').inc(2)
            elif kind == "gauge":
                Gauge(name, "h", registry=registry).set(1.5)
            elif kind == "histogram":
                Histogram(name, "h", buckets=(1.0,), registry=registry).observe(0.5)
            else:
                Summary(name, "h", registry=registry).observe(0.5)
        except ValueError:  # prometheus_client refuses a clash within one registry
            continue
    return text_page(registry)


_FAMILIES = st.lists(st.tuples(_NAMES, st.sampled_from(["counter", "gauge", "histogram",
                                                        "summary"])), max_size=5)


class TestMergeProperties:
    @given(_FAMILIES, _FAMILIES)
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_merged_page_is_valid_and_loses_nothing(
            self, upstream_kinds: list[tuple[str, str]], agent_kinds: list[tuple[str, str]]
    ) -> None:
        """Whatever names both sides use: promtool accepts the page, no family name twice,
        the upstream's page is there verbatim, and every agent family is there (under its
        name or the prefixed one) unless listed as dropped."""
        upstream, agent = _registry(upstream_kinds), _registry(agent_kinds)
        merge = merge_pages(agent, upstream, TEXT)
        assert merge.upstream
        promtool(merge.page, lint=False)
        text = merge.page.decode()
        types = TYPE_LINE.findall(text)
        assert len(types) == len(set(types))
        assert text.startswith(upstream.decode())
        served = {f.name for f in families(text)}
        for family in families(agent.decode()):
            if family.name in merge.dropped:
                continue
            expected = (AGENT_PREFIX + family.name if family.name in merge.renamed
                        else family.name)
            assert expected in served
