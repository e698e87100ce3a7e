"""The shared stdout/stderr writer: agent lines never land inside a child line."""

from __future__ import annotations

import os

from agent.stdio import MAX_HELD_LINES, StdioWriter


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class TestStdioWriter:
    def test_agent_line_waits_for_child_line_end(self) -> None:
        """An agent line written mid child-line comes after the child's newline."""
        r, w = os.pipe()
        writer = StdioWriter(w)
        writer.write_child(b"abc")
        writer.write_agent(b'{"event":"x"}\n')
        writer.write_child(b"def\nghi")
        writer.write_agent(b'{"event":"y"}\n')
        writer.child_closed()
        os.close(w)
        assert read_all(r) == b'abcdef\n{"event":"x"}\nghi\n{"event":"y"}\n'

    def test_held_lines_bounded(self) -> None:
        """While the child stays mid-line, held agent lines are bounded and drops counted."""
        r, w = os.pipe()
        writer = StdioWriter(w)
        writer.write_child(b"progress")
        for i in range(MAX_HELD_LINES + 5):
            writer.write_agent(f"{i}\n".encode())
        assert writer.held_dropped == 5
        writer.child_closed()
        os.close(w)
        assert read_all(r).split(b"\n")[1] == b"5"

    def test_closed_reader_does_not_raise(self) -> None:
        """When nobody reads the output any more, writes are counted, not raised."""
        r, w = os.pipe()
        os.close(r)
        writer = StdioWriter(w)
        writer.write_child(b"data\n")
        assert writer.broken and writer.bytes_discarded == 5
        os.close(w)
