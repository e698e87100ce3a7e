"""Helpers shared by the benchmarks: a safe environment and a result table."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

AGENT = [sys.executable, "-m", "agent", "run", "--"]


def bench_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Dry run, no listeners, dummy credentials, no instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "AWS_"))}
    env.update({
        "AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp / "none"),
        "TELEMETRY_PROMETHEUS": "off", "TELEMETRY_STATSD": "off",
        "TELEMETRY_ENDPOINT_NAME": "bench", "TELEMETRY_HOST": "bench-host",
        "TELEMETRY_LOG_LEVEL": "warning",
    })
    env.update(extra)
    return env


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="agent-bench-"))


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    """A Markdown table: figure, value, target, baseline, ratio."""
    head = ("figure", "agent", "target", "baseline (same run)", "ratio")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
