"""Least-privilege roles: CreateLogGroup denied (moto behind the fault proxy).

SageMaker creates an endpoint's log group itself, and many roles hold only
CreateLogStream and PutLogEvents. The agent must then go on with the existing
group, as the CloudWatch agent does, instead of retrying the AccessDenied forever;
and where the group really is missing, keep the lines instead of dropping them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cloud import FaultProxy, MotoServer, limit_violations
from tests.conftest import agent_events
from tests.integration.conftest import (
    GROUP,
    STREAM,
    RunningAgent,
    cloud_env,
    expected_lines,
    printer,
    stored_messages,
)

pytestmark = pytest.mark.timeout(120)


def test_denied_create_log_group_goes_on_with_the_existing_group(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy) -> None:
    """The group exists, CreateLogGroup is denied: one CreateLogGroup (not retried), one
    warning, and every line arrives. Before, the AccessDenied was retried (5 s, 10 s,
    20 s...) until the batch deadline, then again, and nothing was delivered."""
    moto.client("logs").create_log_group(logGroupName=GROUP)
    proxy.faults.deny_apis = frozenset({"CreateLogGroup"})
    env = cloud_env(tmp_path, proxy, TELEMETRY_SHUTDOWN_TIMEOUT="8")
    code, _, err = RunningAgent(printer(2000), env).wait()
    assert code == 0, err[-2000:]
    assert stored_messages(moto, GROUP, STREAM) == expected_lines(2000)
    assert [s.answer for s in proxy.calls("CreateLogGroup")] == ["denied"]
    events = agent_events(err)
    assert [e["event"] for e in events].count("log_group_not_created") == 1
    stopped = next(e for e in events if e["event"] == "agent_stopped")
    assert stopped["log_events_unsent"] == 0, stopped
    assert limit_violations(proxy.seen) == []


def test_denied_create_log_group_for_a_missing_group_keeps_the_lines(
        tmp_path: Path, moto: MotoServer, proxy: FaultProxy) -> None:
    """No group and no right to make it: CreateLogStream says the group is missing, so
    CreateLogGroup is retried at the credentials' slow pace (not dropped as invalid, not
    in a hot loop), and at shutdown every line is kept in the spool for the next start."""
    proxy.faults.deny_apis = frozenset({"CreateLogGroup"})
    env = cloud_env(tmp_path, proxy, TELEMETRY_SHUTDOWN_TIMEOUT="3",
                    TELEMETRY_SPOOL_DIR=str(tmp_path / "spool"))
    code, _, err = RunningAgent(printer(300), env).wait()
    assert code == 0, err[-2000:]
    stopped = next(e for e in agent_events(err) if e["event"] == "agent_stopped")
    assert stopped["log_events_kept_in_spool"] == 300, stopped
    assert not any(v for k, v in stopped.items() if k.startswith("log_events_dropped")), stopped
    assert proxy.calls("PutLogEvents") == []
    assert 1 <= len(proxy.calls("CreateLogGroup")) <= 6
