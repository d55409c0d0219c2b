"""SIGINT/SIGTERM as an event, so shutdown is code we run, not an exception from anywhere."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """A signal asked us to stop."""


class Signals:
    """Owns the handlers while in use; `interruptible` runs work until a signal arrives."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self.stop.set)
        return self

    def __exit__(self, *exc: object) -> None:
        # The work is over and we are on our way out: a late Ctrl-C or SIGTERM must not
        # turn a clean end into a KeyboardInterrupt or a kill.
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    async def interruptible(self, work: Coroutine[Any, Any, T]) -> T:
        """The result of `work`, or Interrupted (with `work` cancelled and awaited)."""
        task = asyncio.create_task(work)
        waiter = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            try:
                await task
            except asyncio.CancelledError:
                if not self.stop.is_set():
                    raise
        if task.cancelled():
            raise Interrupted
        return task.result()
