"""The disk spool's costs: strict decode of a full batch, and how long a flood's spilling
keeps the event loop inside `put()`, with disk work inline (an outbox made outside the
loop) or on the outbox's worker thread (as in the agent).

Run: python -m bench.spool
"""

from __future__ import annotations

import asyncio
import collections
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from agent.model import LogEvent
from agent.rules.batching import take_log_batch
from agent.sinks import outbox as outbox_module
from agent.sinks.cloudwatch_logs import LOG_CODEC
from agent.sinks.outbox import Outbox, decode_segment, frame

NOW = int(time.time() * 1000)
LINE = "x" * 80
TURNS, PER_TURN = 150, 6000  # ~90 MB of 93-byte lines


def decode_figures() -> None:
    events = [LogEvent(NOW + i // 10, f"line {i:07d} {LINE}", "stdout", 93) for i in range(8800)]
    payload = LOG_CODEC.encode(events)
    segment = frame(payload, len(events))

    def plain() -> object:  # what the agent did before: no checks
        return [LogEvent(int(t), m, s, len(m.encode())) for t, s, m in json.loads(payload)]

    def strict() -> object:
        return decode_segment(segment, LOG_CODEC.decode, len(events))

    for name, fn in (("plain json decode (before)", plain), ("strict decode + CRC32", strict)):
        times = []
        for _ in range(20):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name}: {statistics.median(times) * 1000:.1f} ms per full batch "
              f"({len(segment) / 1e6:.2f} MB)")


def flood(background: bool, pause: float) -> None:
    writers: collections.Counter[str] = collections.Counter()
    real_write = outbox_module.write_file

    def write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
        writers[threading.current_thread().name] += 1
        real_write(path, data, sync_dir=sync_dir)

    outbox_module.write_file = write  # type: ignore[assignment]

    def make() -> Outbox[LogEvent]:
        return Outbox("logs", max_bytes=8 << 20, cost=lambda e: e.size + 160,
                      cut=take_log_batch, codec=LOG_CODEC,
                      spool=Path(tempfile.mkdtemp()), spool_max_bytes=1 << 30)

    inline_box = None if background else make()  # made outside a loop: disk work inline

    async def main() -> list[float]:
        box = make() if background else inline_box
        assert box is not None
        puts = []
        for turn in range(TURNS):
            batch = [LogEvent(NOW, f"line {i:07d} {LINE}", "stdout", 93)
                     for i in range(turn * PER_TURN, (turn + 1) * PER_TURN)]
            start = time.perf_counter()
            box.put(batch)
            puts.append(time.perf_counter() - start)
            await asyncio.sleep(pause)
        await box.settle()
        return puts

    try:
        puts = asyncio.run(main())
    finally:
        outbox_module.write_file = real_write  # type: ignore[assignment]
    rate = PER_TURN * 93 / pause / 1e6
    print(f"{'worker' if background else 'inline'} writes at {rate:.0f} MB/s of lines: "
          f"in put() {sum(puts) * 1000:.0f} ms in all, longest {max(puts) * 1000:.0f} ms; "
          f"segment writes by thread {dict(writers)}")


if __name__ == "__main__":
    decode_figures()
    for pause in (0.03, 0.006):
        for background in (False, True):
            flood(background, pause)
