"""Every benchmark in one command: `python -m bench` (or `bench/run`), one table at the end.

Runs each benchmark module in its own process (so one's warm caches do not flatter
another), keeps their table rows, and prints them as one table with the machine they ran
on. A benchmark whose peer is missing (nginx, wrk, node_exporter) says so and is skipped.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

MODULES = ("bench.passthrough", "bench.delivery", "bench.proxy", "bench.hooks", "bench.idle")
HEAD = "| figure | agent | target | baseline (same run) | ratio |"


def main() -> int:
    rows: list[str] = []
    failed = []
    for module in MODULES:
        started = time.monotonic()
        print(f"# {module} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            failed.append(f"{module}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            continue
        rows += [line for line in done.stdout.splitlines()
                 if line.startswith("| ") and line != HEAD and not line.startswith("|---")]
        print(f"#   {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {platform.platform()}")
    print(HEAD)
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    for line in failed:
        print(f"skipped or failed: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
