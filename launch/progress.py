"""The sweep's progress line on stderr."""
from __future__ import annotations

import sys
import time

from launch.trial import finite


def fmt_time(s: float) -> str:
    if not finite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`sweep: 5/15 ok, 1 failed, 2 running, 7 queued | 4m10s elapsed, ETA 12m30s` on stderr: one updating
    line on a terminal, else a line whenever the counts change, and once a minute."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty = stream, stream.isatty()
        self.last_counts, self.last_text, self.last_time = None, "", 0.0

    def show(self, counts: tuple, text: str, force: bool = False) -> None:
        now = time.time()
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif force or counts != self.last_counts or now - self.last_time > 60:
            print(text, file=self.stream, flush=True)
            self.last_time = now
        self.last_counts, self.last_text = counts, text

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)
        if self.tty and self.last_text:
            self.stream.write(self.last_text)
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
