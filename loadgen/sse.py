"""Incremental Server-Sent Events parsing, the part of the format OpenAI-style streams use.

Network chunks ignore event boundaries: one chunk may hold several events, and an event, a line, or
even the two bytes of a CRLF may be split across chunks. The parser keeps the unfinished tail between
feeds and returns each completed event's data as bytes (data lines joined with b"\\n").
"""

from __future__ import annotations


class SSEParser:
    __slots__ = ("_tail", "_data")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event this chunk completes."""
        buf = self._tail + chunk if self._tail else chunk
        held = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                # May be the first half of a CRLF whose LF is still in flight.
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._tail = lines.pop() + held
        return self._lines(lines)

    def close(self) -> list[bytes]:
        """End of stream. Leniently returns a last event whose closing blank line never came."""
        tail, self._tail = self._tail, b""
        lines = [tail.rstrip(b"\r")] if tail else []
        return self._lines(lines + [b""])

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:") or line == b"data":
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # Comments (":...") and the event/id/retry fields carry nothing a completion stream needs.
        return events
