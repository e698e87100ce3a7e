"""Child output under the agent vs. the same child piped into `cat`.

Targets: 300,000 unbuffered 100 B lines, target ≤ 1.3x the `cat` time; and
lines/s framed into PutLogEvents batches (file sink), target ≥ 100,000/s.
Run: python -m bench.passthrough [--lines N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import AGENT, bench_env, table, tmpdir

# The child times its own print loop and leaves the figure in a file: that is the time
# the model server itself would lose. The agent's total (startup to flushed exit) is
# reported beside it.
CHILD = ("import os, sys, time\nn, out = int(sys.argv[1]), sys.argv[2]\n"
         "line = b'x' * 99 + b'\\n'\nw = os.write\nt = time.perf_counter()\n"
         "for _ in range(n):\n    w(1, line)\n"
         "open(out, 'w').write(str(time.perf_counter() - t))\n")


def timed(cmd: list[str] | str, env: dict[str, str], loop_file: Path,
          shell: bool = False) -> tuple[float, float]:
    """(child's own loop time, whole command's wall time)."""
    started = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True, shell=shell)  # noqa: S603
    wall = time.perf_counter() - started
    return float(loop_file.read_text()), wall


def measure(lines: int, repeats: int) -> dict[str, float]:
    tmp = tmpdir()
    script = tmp / "child.py"
    script.write_text(CHILD)
    sink = tmp / "calls.jsonl"
    env = bench_env(tmp, TELEMETRY_FILE_SINK=str(sink))
    py = sys.executable
    loop_file = tmp / "loop"
    cat, agent = [], []
    for _ in range(repeats):
        cat.append(timed(f"{py} {script} {lines} {loop_file} | cat", env, loop_file, shell=True))
        sink.unlink(missing_ok=True)
        agent.append(timed([*AGENT, py, str(script), str(lines), str(loop_file)], env, loop_file))
    delivered = sum(len(json.loads(r)["params"]["logEvents"])
                    for r in sink.read_text().splitlines() if '"PutLogEvents"' in r)
    cat_loop, cat_wall = min(c[0] for c in cat), min(c[1] for c in cat)
    agent_loop, agent_wall = min(a[0] for a in agent), min(a[1] for a in agent)
    return {"lines": lines, "cat_loop": cat_loop, "agent_loop": agent_loop,
            "cat_wall": cat_wall, "agent_wall": agent_wall, "delivered": delivered,
            "lines_per_s": delivered / agent_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    r = measure(args.lines, args.repeats)
    n = f"{r['lines'] // 1000}k"
    print(table([
        (f"child print loop, {n} x 100 B unbuffered (s)", f"{r['agent_loop']:.3f}", "≤ 1.3x cat",
         f"cat {r['cat_loop']:.3f}", f"{r['agent_loop'] / r['cat_loop']:.2f}x"),
        (f"whole run incl. agent start, framing, flush (s)", f"{r['agent_wall']:.3f}", "—",
         f"cat {r['cat_wall']:.3f}", f"{r['agent_wall'] / r['cat_wall']:.2f}x"),
        ("lines into PutLogEvents batches (file sink), lines/s, whole run",
         f"{r['lines_per_s']:,.0f}", "≥ 100,000", "—", f"{r['delivered']}/{r['lines']} delivered"),
    ]))


if __name__ == "__main__":
    main()
