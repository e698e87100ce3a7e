"""The door: every figure checked against CloudWatch's rules before it enters aggregation.

The property tests feed arbitrary figures (any text, any float, any number of
dimensions) through the aggregator and the request packing, and check every call
that comes out with an oracle written apart from the agent (tests/cloudwatch_rules.py):
no PutMetricData call may ever be refused for its content.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.aggregation.aggregator import Aggregator
from agent.model import MetricKey
from agent.rules.metric_data import datum_problem, datums, split_metric_data
from agent.rules.validation import (
    API_MAX,
    API_MIN,
    MAX_VALUE,
    MIN_MAGNITUDE,
    REASONS,
    UNITS,
    key_problem,
    number_problem,
    value_problem,
)
from tests.cloudwatch_rules import call_problems

GOOD = MetricKey("NS", "queue_depth", (("EndpointName", "e"), ("queue", "a")), "Count")


class TestValues:
    def test_range_and_special_values(self) -> None:
        """0 and magnitudes within 2^-260..2^300 pass; NaN, infinities and the rest do not."""
        for value in (0.0, -0.0, 1.0, -12.5, MAX_VALUE, -MAX_VALUE, MIN_MAGNITUDE, -MIN_MAGNITUDE):
            assert value_problem(value) is None, value
        assert value_problem(math.nan) == "value_not_finite"
        assert value_problem(math.inf) == value_problem(-math.inf) == "value_not_finite"
        assert value_problem(1e300) == value_problem(-MAX_VALUE * 2) == "value_too_large"
        assert value_problem(1e-300) == value_problem(-MIN_MAGNITUDE / 2) == "value_too_small"

    def test_api_bounds_are_the_documented_ones(self) -> None:
        """The last guard uses CloudWatch's own bounds, about 2^±359, and the door's are inside
        them with room for sums (2^58 values) and differences (multiples of 2^-312)."""
        assert number_problem(API_MAX) is None and number_problem(API_MIN) is None
        assert number_problem(API_MAX * 1.0001) == "value_too_large"
        assert number_problem(API_MIN / 10) == "value_too_small"
        assert MAX_VALUE * 2.0 ** 58 <= API_MAX and 2.0 ** -312 >= API_MIN


class TestKeys:
    def test_each_reason(self) -> None:
        """Each way a name, dimension or unit breaks the rules has its own reason."""
        base = (("EndpointName", "e"),)
        cases = {
            MetricKey(":NS", "m", base, "Count"): "namespace",
            MetricKey("NS", "", base, "Count"): "metric_name_length",
            MetricKey("NS", "m" * 256, base, "Count"): "metric_name_length",
            MetricKey("NS", "latência", base, "Count"): "metric_name_charset",
            MetricKey("NS", "a\tb", base, "Count"): "metric_name_charset",
            MetricKey("NS", "   ", base, "Count"): "metric_name_charset",
            MetricKey("NS", "m", tuple((f"d{i}", "v") for i in range(31)), "Count"):
                "too_many_dimensions",
            MetricKey("NS", "m", (("d" * 256, "v"),), "Count"): "dimension_name_length",
            MetricKey("NS", "m", (("régión", "v"),), "Count"): "dimension_name_charset",
            MetricKey("NS", "m", ((":d", "v"),), "Count"): "dimension_name_charset",
            MetricKey("NS", "m", (("d", ""),), "Count"): "dimension_value_length",
            MetricKey("NS", "m", (("d", "v" * 1025),), "Count"): "dimension_value_length",
            MetricKey("NS", "m", (("d", "a\x00b"),), "Count"): "dimension_value_charset",
            MetricKey("NS", "m", (("d", " "),), "Count"): "dimension_value_charset",
            MetricKey("NS", "m", (("d", "1"), ("d", "2")), "Count"): "dimension_duplicate",
            MetricKey("NS", "m", base, "Furlongs"): "unit",
        }
        for key, reason in cases.items():
            assert key_problem(key) == reason, key
            assert reason in REASONS
        assert key_problem(GOOD) is None
        assert key_problem(MetricKey("NS", "m" * 255, tuple(
            (f"d{i:02d}", "v" * 1024) for i in range(30)), "Count/Second")) is None


class TestAggregatorDoor:
    def test_refused_figures_counted_by_reason_never_stored(self) -> None:
        """Bad figures are counted per reason; good ones beside them are kept."""
        agg = Aggregator(60)
        assert agg.add(GOOD, 1.0, 61.0)
        assert not agg.add(GOOD, 1e300, 61.0)
        assert not agg.add(GOOD, 1e-300, 61.0)
        assert not agg.add(GOOD._replace(name="ümlaut"), 1.0, 61.0)
        assert not agg.add(GOOD._replace(name="ümlaut"), 2.0, 62.0)
        counts = agg.counters()
        assert counts["datums_rejected"] == 4
        assert counts["datums_rejected_value_too_large"] == 1
        assert counts["datums_rejected_value_too_small"] == 1
        assert counts["datums_rejected_metric_name_charset"] == 2
        (closed,) = agg.close(121.0)
        assert list(closed.stats) == [GOOD] and closed.stats[GOOD].count == 1

    def test_merge_checks_its_figures_too(self) -> None:
        """Pre-counted figures (the request tallies) pass the same door."""
        agg = Aggregator(60)
        agg.merge(60, [(GOOD, {1.0: 3, 1e300: 2}, True)])
        assert agg.counters()["datums_rejected_value_too_large"] == 2
        stat = agg.close(121.0)[0].stats[GOOD]
        assert stat.count == 3 and stat.values == {1.0: 3}


# -- property: nothing that passes the door makes a refused call -------------------------------

_TEXT = st.text(max_size=40) | st.text(
    st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=300)
_VALUES = (st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0.0, -0.0, MAX_VALUE, -MAX_VALUE, MIN_MAGNITUDE, 1e300, 1e-300,
                              API_MAX, API_MIN, 5e-324])
           | st.floats(min_value=MIN_MAGNITUDE, max_value=MIN_MAGNITUDE * 64).map(
               lambda v: v if int(v / MIN_MAGNITUDE) % 2 else -v))
_KEYS = st.builds(
    MetricKey, st.sampled_from(["NS", "SageMakerAgent", ":bad", "AWS/ünicode"]), _TEXT,
    st.lists(st.tuples(_TEXT, _TEXT), max_size=33).map(tuple),
    st.sampled_from(sorted(UNITS) + ["", "Furlongs"]))
_FIGURES = st.lists(st.tuples(_KEYS, _VALUES, st.booleans(), st.booleans(),
                              st.sampled_from([1.0, 3.0, 0.5, 1000.0])), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_FIGURES, st.lists(_VALUES, max_size=200))
def test_no_call_can_be_refused_for_its_content(
        figures: list[tuple[MetricKey, float, bool, bool, float]], many: list[float]) -> None:
    """Arbitrary figures (and many values on one metric, sums and differences included)
    through aggregation and packing: every call passes the oracle, and every figure the
    door accepted is in a call."""
    agg = Aggregator(60)
    agg.close(60.0)
    accepted: set[tuple[str, str]] = set()
    for key, value, distribution, custom, weight in figures:
        ok = agg.add(key, value, 61.0, distribution=distribution, custom=custom, weight=weight)
        assert ok == (value_problem(value) is None and key_problem(key) is None)
        if ok:
            accepted.add((key.namespace, key.name))
    for n, value in enumerate(many):
        agg.add(GOOD, value, 61.0, distribution=n % 2 == 0)
        agg.add(GOOD._replace(name="plain"), value, 61.0, custom=True)
    (closed,) = agg.close(121.0)
    sent: set[tuple[str, str]] = set()
    for custom in (False, True):
        for namespace, items in datums(closed, high_resolution=False, custom=custom).items():
            assert all(datum_problem(namespace, d) is None for d in items)
            for batch in split_metric_data(namespace, items):
                problems = call_problems({"Namespace": namespace, "MetricData": batch})
                assert not problems, problems[:3]
                sent |= {(namespace, d["MetricName"]) for d in batch}
    assert accepted <= sent


@settings(max_examples=150, deadline=None)
@given(_KEYS, _VALUES)
def test_the_door_accepts_only_what_the_service_takes(key: MetricKey, value: float) -> None:
    """One figure alone: whatever the door lets in, the oracle accepts as a call."""
    if key_problem(key) is None and value_problem(value) is None:
        datum = {"MetricName": key.name, "Unit": key.unit, "Value": value,
                 "Dimensions": [{"Name": n, "Value": v} for n, v in key.dimensions]}
        assert call_problems({"Namespace": key.namespace, "MetricData": [datum]}) == []
