"""Which event loop runs the tool: uvloop (a dependency where it has wheels) when present.

uvloop does the per-connection and per-read work of the loop in C; with it, short
connections through a forward are markedly cheaper (see docs/PERFORMANCE.md). The standard
loop stays fully supported: `TETE_TUNNEL_LOOP=asyncio` picks it, `=uvloop` insists on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from tete_tunnel.errors import UsageError

log = logging.getLogger("tete_tunnel")

ENV = "TETE_TUNNEL_LOOP"
CHOICES = ("auto", "asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's own; UsageError for a bad choice."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UsageError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(
                f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on the chosen loop."""
    try:
        factory = loop_factory()
    except UsageError:
        coro.close()
        raise
    log.debug("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)
