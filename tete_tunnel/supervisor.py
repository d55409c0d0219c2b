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
failure. Nothing here prints (but the terminal's status line while we wait for the peer);
the CLI reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from tete_tunnel import log as logmod
from tete_tunnel import status
from tete_tunnel.errors import Closed, LinkBroken, NotConfirmed, PeerDeclined, TeteError
from tete_tunnel.mux.errors import GoAwayCode
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
# After an upgrade to a direct link, the relayed session is closed once its streams have
# ended (they finish there), or after this long at the most.
RETIRE_LIMIT = 600.0
# When the peer retires the relayed session (GO_AWAY MOVED) before our side of the direct
# link is ready, how long we wait for it before taking the link as lost (and reconnecting).
FOLLOW_WAIT = 20.0


class Ending(enum.Enum):
    """How a command ended in order."""

    BY_US = "Closed connection"  # our work was done, or a signal asked us to stop
    BY_PEER = "Peer closed connection"  # the peer closed the session in order


class Connector(Protocol):
    """How an authenticated link is obtained: direct punching, or a relay's rendezvous."""

    async def connect(self, deadline: float | None) -> SecureLink: ...
    def describe(self) -> str: ...


class Upgrading(Protocol):
    """A connector that, while a link goes through a relay, can find a direct one."""

    async def upgrade(self) -> SecureLink: ...
    async def aclose(self) -> None: ...


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
    confirm: Callable[[SecureLink], Awaitable[bool]] | None = None,
) -> Ending:
    """Run `app` over links from `connector` until it ends; see the module docstring.

    `stop` stands for the signals when given (no handlers are installed then). `confirm`
    asks our user about the first link (its safety code) before the app may use it; False
    ends the run with NotConfirmed, and the peer is told (GO_AWAY NOT_CONFIRMED).
    """
    loop = asyncio.get_running_loop()
    with Signals(stop) as signals:
        try:
            await app.prepare()
            try:
                deadline = loop.time() + timeout
                async with _waiting(connector, deadline):
                    link = await _until_stopped(signals, connector.connect(deadline))
            except Interrupted:
                raise Interrupted("interrupted before the peer was connected") from None
            pause = FIRST_PAUSE
            while True:
                started = loop.time()
                logmod.event(_connected(link))
                try:
                    return await _one_session(link, app, signals, keepalive, connector, confirm)
                except LinkBroken as broken:
                    if not app.reconnect or isinstance(broken, PeerDeclined):
                        raise
                    log.warning("Reconnecting (%s)", broken)
                try:
                    if loop.time() - started < QUICK_FAILURE:
                        await _until_stopped(signals, asyncio.sleep(pause))
                        pause = min(MAX_PAUSE, pause * 2)
                    else:
                        pause = FIRST_PAUSE
                    async with _waiting(connector, None):
                        link = await _until_stopped(signals, connector.connect(None))
                except Interrupted:
                    return Ending.BY_US
                # The first link fixed the peer, and our user confirmed it (or the run ended
                # in _confirmed): later links are pinned to it.
                confirm = None
        finally:
            await app.close()
            closing = getattr(connector, "aclose", None)
            if closing is not None:
                await closing()


def _waiting(connector: Connector, deadline: float | None) -> Any:
    """The status line while we wait for the peer: what for, and the seconds left."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    describe = getattr(connector, "waiting_for", None)
    what = describe() if describe is not None else "the peer"

    def render() -> str:
        if deadline is None:
            return f"waiting for {what} ... {loop.time() - started:.0f} s"
        return f"waiting for {what} ... {max(0, math.ceil(deadline - loop.time()))} s left"

    return status.ticking(render, 0.5)


def _connected(link: SecureLink) -> str:
    """The seed's line; with a relay in play, which path the link takes."""
    return "Connected to peer!" + (f" ({link.path})" if link.path else "")


async def _one_session(
    link: SecureLink,
    app: App,
    signals: Signals,
    keepalive: Keepalive | None,
    connector: Connector,
    confirm: Callable[[SecureLink], Awaitable[bool]] | None = None,
) -> Ending:
    """Run the app over one session; the session's end decides what this returns.

    A relayed link of an app that reconnects (forward) is upgraded when the connector finds
    a direct one: the app moves its new work to a session over it, the relayed session is
    retired (its streams finish there, then it is closed), and the direct one goes on here.
    """
    async with contextlib.AsyncExitStack() as sessions:
        session = await sessions.enter_async_context(_session(link, keepalive))
        if confirm is not None:
            await _confirmed(confirm, link, session, signals)
        work = asyncio.ensure_future(app.run(session, link))
        stop = asyncio.ensure_future(signals.stop.wait())
        upgrading = _upgrading(link, app, connector)
        retired: list[asyncio.Future[Any]] = []
        try:
            while True:
                waiting = [work, stop, *([upgrading] if upgrading else [])]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                moved = upgrading is not None and work.done() and session.peer_moved
                if moved and not upgrading.done() and not stop.done():
                    # The peer's side of the direct link was ready before ours: follow it.
                    await asyncio.wait(
                        [upgrading, stop], timeout=FOLLOW_WAIT, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not upgrading.done() and not stop.done():
                        raise LinkBroken("the peer moved to a direct link that did not reach us")
                if upgrading is None or not upgrading.done() or stop.done():
                    break
                if work.done() and not moved:
                    break
                direct = upgrading.result()
                upgrading = None
                log.warning("Upgraded to a direct connection")
                old_session, old_work = session, work
                session = await sessions.enter_async_context(_session(direct, keepalive))
                work = asyncio.ensure_future(app.run(session, direct))
                retired += [old_work, asyncio.ensure_future(_retire(old_session))]
            if not work.done():
                app.interrupt()
                await asyncio.wait([work], timeout=STOP_GRACE)
        finally:
            for task in (stop, upgrading, *retired):
                if task is not None:
                    task.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(
                work, stop, *(t for t in (upgrading, *retired) if t), return_exceptions=True
            )
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


async def _confirmed(
    confirm: Callable[[SecureLink], Awaitable[bool]],
    link: SecureLink,
    session: Session,
    signals: Signals,
) -> None:
    """Ask our user about the link while its session runs (pings are answered, the peer's
    go-away is seen) but before the app serves anything: the peer's streams wait unanswered.
    Returns on a yes; otherwise the session ends and this raises why."""
    asking = asyncio.ensure_future(confirm(link))
    ended = asyncio.ensure_future(session.ended.wait())
    stop = asyncio.ensure_future(signals.stop.wait())
    try:
        await asyncio.wait([asking, ended, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (asking, ended, stop):
            task.cancel()
        await asyncio.gather(asking, ended, stop, return_exceptions=True)
    if asking.done() and not asking.cancelled() and asking.exception() is None:
        if asking.result():
            return
        await session.close(GoAwayCode.NOT_CONFIRMED)
        raise NotConfirmed(
            "the safety code was not confirmed: the link was closed before any data went "
            "through (verify the peer with --code or --peer-id)"
        )
    if isinstance(session.error, PeerDeclined):
        raise session.error
    if session.ended.is_set():
        # Not a reason to link again: a new link would be pinned to this unconfirmed peer.
        why = session.error.cause if session.error is not None else "the peer closed it"
        raise NotConfirmed(f"the link was lost before the safety code was confirmed ({why})")
    await session.close(GoAwayCode.CANCELLED)
    if not asking.cancelled() and asking.exception() is not None:
        raise asking.exception()  # type: ignore[misc]
    raise Interrupted("interrupted before the safety code was confirmed")


def _session(link: SecureLink, keepalive: Keepalive | None) -> Session:
    return Session(link.carrier, client=link.is_tls_client, config=mux_config(keepalive))


def _upgrading(link: SecureLink, app: App, connector: Connector) -> asyncio.Future[Any] | None:
    upgrade = getattr(connector, "upgrade", None)
    if upgrade is None or not app.reconnect or not (link.path or "").startswith("relayed"):
        return None
    return asyncio.ensure_future(upgrade())


async def _retire(session: Session) -> None:
    """Close a session that new work no longer goes to, once its streams have ended."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RETIRE_LIMIT):
            await session.no_streams()
    await session.close(GoAwayCode.MOVED)  # the peer follows to the direct link
