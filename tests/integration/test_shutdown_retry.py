"""Shutdown cuts a long retry backoff short, so the last batches are delivered, not spooled."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.rules.retry import RetryPolicy
from agent.sinks.aws import AwsCaller
from tests.cloud import REGION, FaultProxy, MotoServer

# Rejected credentials wait auth_base before the next try: 30 s here, far past the test.
SLOW = RetryPolicy(auth_base=30.0, auth_cap=30.0)


def test_hurry_retries_a_call_waiting_out_its_backoff_now(
        monkeypatch: pytest.MonkeyPatch, moto: MotoServer, proxy: FaultProxy) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.faults.reject_credentials = True
    caller = AwsCaller(send=True, file_sink=None, region=REGION, timeout=5, policy=SLOW)
    params = {"Namespace": "Test", "MetricData": [{"MetricName": "M", "Value": 1.0}]}

    async def scenario() -> float:
        call = asyncio.create_task(caller.deliver("cloudwatch", "PutMetricData", params,
                                                  deadline=time.monotonic() + 120))
        while not caller.stats["retries", "PutMetricData", "auth"]:  # now in its 30 s wait
            await asyncio.sleep(0.02)
        proxy.faults.reject_credentials = False
        hurried = time.monotonic()
        caller.hurry()
        await asyncio.wait_for(call, timeout=10)
        return time.monotonic() - hurried

    assert asyncio.run(scenario()) < 5
    assert caller.stats["calls", "PutMetricData", "ok"] == 1
