"""One owner for a command's lifetime: signals, the connector, the session, the application.

    supervise(connector, app)
        app.prepare()                      bind what must exist before the link (-L ports)
        loop:
            connector.connect()            an authenticated link (punch + HELLO + TLS)
            Session over it                the mux
            app.run(session)               forward or pipe, until it is done with the session
            the session's end decides:     orderly -> return how it ended
                                           broken  -> reconnect (if the app wants it) or raise
        app.close()

Signals (INT, TERM, HUP) are events here, never exceptions thrown into the middle of work:
the app is asked to stop (`interrupt`), and the session is closed in order. The outcome is
typed: an `Ending` for an orderly end, a `LinkBroken` subclass (or another TeteError) for a
failure. Nothing here prints; the CLI reports.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from tete_tunnel import log as logmod
from tete_tunnel.errors import Closed, LinkBroken, TeteError
from tete_tunnel.secure import SecureLink
from tete_tunnel.session import Keepalive, Session, mux_config

log = logging.getLogger("tete_tunnel")
T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE = 5.0  # after interrupt(), how long the app may take to let go of the session
# A session that broke soon after it began is not retried at once: the pause doubles up to
# the cap, so a peer that keeps failing costs a few attempts a minute.
QUICK_FAILURE = 10.0
FIRST_PAUSE = 0.5
MAX_PAUSE = 5.0


class Ending(enum.Enum):
    """How a command ended in order."""

    BY_US = "Closed connection"  # our work was done, or a signal asked us to stop
    BY_PEER = "Peer closed connection"  # the peer closed the session in order


class Connector(Protocol):
    """How an authenticated link is obtained (direct punching today; a relay later)."""

    async def connect(self, deadline: float | None) -> SecureLink: ...
    def describe(self) -> str: ...


class App(Protocol):
    """What runs over the session: forward or pipe."""

    reconnect: bool  # a broken link is worth a new one (forward), or the end (pipe)

    async def prepare(self) -> None: ...
    async def run(self, session: Session, link: SecureLink) -> Ending: ...
    def interrupt(self) -> None: ...
    async def close(self) -> None: ...


class Signals:
    """Owns the handlers of INT, TERM and HUP while in use; a signal sets `stop`.

    Given an event of its own (tests running two supervisors in one process), it installs
    no handlers and that event stands for the signals.
    """

    def __init__(self, stop: asyncio.Event | None = None) -> None:
        self._own = stop is None
        self.stop = stop if stop is not None else asyncio.Event()
        self.received: signal.Signals | None = None
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> Signals:
        if self._own:
            for sig in SIGNALS:
                self._loop.add_signal_handler(sig, self._set, sig)
        return self

    def _set(self, sig: signal.Signals) -> None:
        self.received = self.received or sig
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        # The work is over and we are on our way out: a late signal must not turn a clean
        # end into a KeyboardInterrupt or a kill.
        if not self._own:
            return
        for sig in SIGNALS:
            self._loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


class Interrupted(TeteError):
    """A signal arrived before there was anything to close in order."""


async def _until_stopped(signals: Signals, work: Awaitable[T]) -> T:
    """The result of `work`, or Interrupted with `work` cancelled and awaited."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(signals.stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if task.cancelled():
        raise Interrupted("interrupted")
    return task.result()


async def supervise(
    connector: Connector,
    app: App,
    *,
    timeout: float,  # noqa: ASYNC109  (the first link's deadline; later links have none)
    keepalive: Keepalive | None,
    stop: asyncio.Event | None = None,
) -> Ending:
    """Run `app` over links from `connector` until it ends; see the module docstring.

    `stop` stands for the signals when given (no handlers are installed then).
    """
    loop = asyncio.get_running_loop()
    with Signals(stop) as signals:
        try:
            await app.prepare()
            try:
                link = await _until_stopped(signals, connector.connect(loop.time() + timeout))
            except Interrupted:
                raise Interrupted("interrupted before the peer was connected") from None
            pause = FIRST_PAUSE
            while True:
                started = loop.time()
                logmod.event("Connected to peer!")
                try:
                    return await _one_session(link, app, signals, keepalive)
                except LinkBroken as broken:
                    if not app.reconnect:
                        raise
                    log.warning("Reconnecting (%s)", broken)
                try:
                    if loop.time() - started < QUICK_FAILURE:
                        await _until_stopped(signals, asyncio.sleep(pause))
                        pause = min(MAX_PAUSE, pause * 2)
                    else:
                        pause = FIRST_PAUSE
                    link = await _until_stopped(signals, connector.connect(None))
                except Interrupted:
                    return Ending.BY_US
        finally:
            await app.close()


async def _one_session(
    link: SecureLink, app: App, signals: Signals, keepalive: Keepalive | None
) -> Ending:
    """Run the app over one session; the session's end decides what this returns."""
    async with Session(
        link.carrier, client=link.is_tls_client, config=mux_config(keepalive)
    ) as session:
        work = asyncio.ensure_future(app.run(session, link))
        stop = asyncio.ensure_future(signals.stop.wait())
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                app.interrupt()
                await asyncio.wait([work], timeout=STOP_GRACE)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, stop, return_exceptions=True)
        if work.cancelled():
            await session.close()
            return Ending.BY_US
        error = work.exception()
        if error is None:
            await session.close()
            return work.result()
        if session.error is not None and isinstance(error, (LinkBroken, Closed)):
            raise session.error from None  # the app failed because the link did
        if isinstance(error, TeteError):
            await session.close()
        raise error
