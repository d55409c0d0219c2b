"""Feedback for a person at a terminal: one status line on stderr that updates in place.

Only when stderr is a terminal (or when forced); never in a pipeline, where stderr is a file
or a pipe and a carriage return would be noise. The line is redrawn with `\\r` and erased
with `\\r` + ESC[K; log lines go through `StatusLine.around_log`, which erases the line
before the log line and redraws it after, so a log line never lands in the middle of it.

Everything here runs on the event loop's thread (the log handler too: our loggers are only
called from there), so no locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TextIO

ERASE = "\r\x1b[K"
# Redraws at most this often: a line that changes faster cannot be read and costs CPU.
MIN_INTERVAL = 0.25


def _width() -> int:
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 200
    return max(20, columns) if columns else 200  # 0: a terminal that has not said


def stderr_is_terminal() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False


class StatusLine:
    """The one status line of this process; `enabled` False makes every call a no-op."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = False) -> None:
        self.stream = stream
        self.enabled = enabled
        self.text = ""  # what is shown now ("" when nothing is)

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        text = text[: _width() - 1]  # a line that wraps cannot be erased with \r
        if text == self.text:
            return
        self.text = text
        self._write(ERASE + text)

    def clear(self) -> None:
        if self.text:
            self.text = ""
            self._write(ERASE)

    @contextlib.contextmanager
    def around_log(self) -> Iterator[None]:
        """Erase the line for a log line, then draw it again below it."""
        shown = self.text
        if shown:
            self._write(ERASE)
        try:
            yield
        finally:
            if shown and self.text == shown:
                self._write(shown)

    def _write(self, data: str) -> None:
        stream = self.stream or sys.stderr
        with contextlib.suppress(OSError, ValueError):
            stream.write(data)
            stream.flush()


status = StatusLine()


def enable(on: bool) -> None:
    status.enabled = on
    if not on:
        status.clear()


@contextlib.asynccontextmanager
async def ticking(render: Callable[[], str], interval: float = 0.5) -> AsyncIterator[None]:
    """Show `render()` every `interval` seconds while the body runs; erase it after.

    The ticker is a task owned here: cancelled and awaited on the way out."""
    if not status.enabled:
        yield
        return
    interval = max(interval, MIN_INTERVAL)

    async def tick() -> None:
        while True:
            status.show(render())
            await asyncio.sleep(interval)

    task = asyncio.ensure_future(tick())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        status.clear()


def size(n: float) -> str:
    """Bytes the way pv shows them: 0 B, 512 B, 10.0 KiB, 2.1 MiB, 1.00 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def seconds(t: float) -> str:
    if t < 60:
        return f"{t:.1f} s"
    minutes, secs = divmod(int(t), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
