"""Connectors: how an authenticated link to the peer is obtained.

`DirectConnector` punches to the address the user typed and authenticates what answers.
A stranger on the port (another service behind a wrong --rport, a port scanner, an
impostor while we wait to reconnect) is dropped, and punching goes on after a pause that
grows with every such failure, so a wrong port is knocked on a few times, not hundreds.

The first link fixes who the peer is: its ID is pinned for every later link, whatever mode
the first one used (--peer-id, the ID learnt through --code, or trust on first use). Later
links never obey a stranger: every failure there is logged and waiting goes on.

Connection options shared by every command live here as one frozen config, so `pipe`,
`forward` and tests build links the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tete_tunnel.errors import (
    AuthenticationError,
    HandshakeError,
    PunchError,
    TeteError,
    UsageError,
)
from tete_tunnel.hello import NotAPeer
from tete_tunnel.identity import Identity
from tete_tunnel.net import endpoint, family_of, is_local_address, resolve_peer_host_async
from tete_tunnel.punch import (
    Attempts,
    accept_peer,
    dial_once,
    listen,
    no_peer_message,
    tune_link_socket,
)
from tete_tunnel.secure import (
    PREAUTH_TIMEOUT,
    WRONG_CODE,
    Arbiter,
    Auth,
    CodeGuessFailed,
    Duplicate,
    Mode,
    Progress,
    Rejected,
    SecureLink,
    secure,
)
from tete_tunnel.session import Keepalive

log = logging.getLogger("tete_tunnel")

DEFAULT_PORT = 54312
DEFAULT_TIMEOUT = 30.0
# After a connection from the peer's address fails its handshake, wait before the next
# dial: doubling from the first pause to the cap, reset by a good link.
HANDSHAKE_BACKOFF = 0.5
MAX_HANDSHAKE_BACKOFF = 5.0
# Pre-authentication connections handshaken at once; more from the peer's address wait for a
# slot no longer than it takes to refuse them. Strangers that stall hold a slot at most
# PREAUTH_TIMEOUT, and never the only one.
MAX_HANDSHAKES = 8


@dataclass(frozen=True)
class LinkConfig:
    peer_ip: str
    local_port: int = DEFAULT_PORT
    peer_port: int = DEFAULT_PORT
    my_ip: str | None = None
    auth: Auth = field(default_factory=Auth)
    identity_dir: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    keepalive: Keepalive | None = None  # None: no application pings (TCP's defaults only)
    # The host name --peer-ip gave (dynamic DNS), resolved to peer_ip at start and again
    # before each reconnect; None when --peer-ip was an address.
    peer_host: str | None = None

    def check(self) -> None:
        """Refuse impossible combinations before touching the network."""
        family = family_of(self.peer_ip)
        if self.my_ip is not None and family_of(self.my_ip) != family:
            raise UsageError(
                f"--my-ip {self.my_ip} and --peer-ip {self.peer_ip} are of different IP versions"
            )
        for name, port in (("--lport", self.local_port), ("--rport", self.peer_port)):
            if not 1 <= port <= 65535:
                raise UsageError(f"{name} {port} is not a TCP port (1-65535)")
        if self.timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        if self.keepalive is not None:
            if self.keepalive.interval <= 0 or self.keepalive.timeout <= 0:
                raise UsageError("keepalive interval and timeout must be positive seconds")
            if self.keepalive.timeout <= self.keepalive.interval:
                raise UsageError(
                    f"--keepalive-timeout {self.keepalive.timeout:g} must be longer than "
                    f"--keepalive-interval {self.keepalive.interval:g}"
                )
        if self.local_port == self.peer_port and is_local_address(self.peer_ip):
            raise UsageError(
                f"--peer-ip {self.peer_ip} is this machine and --lport equals --rport "
                f"({self.local_port}): the socket would connect to itself; use two ports"
            )


class _Drops:
    """Dropped connections, logged once per cause and then counted (never a flood)."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.repeats = 0
        self.total = 0
        self.kinds: dict[str, int] = {}  # Rejected.kind, "not-a-peer" or "other"
        self.last_reason: dict[str, str] = {}

    def add(self, far: str, error: Exception) -> None:
        self.total += 1
        kind = (
            error.kind
            if isinstance(error, Rejected)
            else "not-a-peer"
            if isinstance(error, NotAPeer)
            else "other"
        )
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.last_reason[kind] = str(error)
        line = f"dropped a connection from {far}: {error}"
        if line == self.last:
            self.repeats += 1
            return
        self.flush()
        self.last = line
        log.warning("%s", line)

    def flush(self) -> None:
        if self.repeats:
            times = "time" if self.repeats == 1 else "times"
            log.warning("(the same again %d more %s)", self.repeats, times)
        self.repeats = 0


class DirectConnector:
    """Punch to the peer's public address; a stranger there never ends the wait."""

    def __init__(self, config: LinkConfig, identity: Identity) -> None:
        config.check()
        self.config = config
        self.identity = identity
        self.pinned: bytes | None = None  # the peer's fingerprint, once a link was made
        # Handshakes that failed after our nonce went out: each one a safety code a man in
        # the middle may have drawn. Shown next to the code (unverified mode).
        self.codes_drawn = 0
        self.attempted = False  # a first connect() ran: the next ones resolve peer_host again

    def describe(self) -> str:
        return "direct"

    def save_hint(self) -> str:
        """The options of `tete-tunnel peers add` that reach this peer again."""
        config = self.config
        hint = f"--ip {config.peer_host or config.peer_ip} --port {config.peer_port}"
        return hint + (f" --lport {config.local_port}" if config.local_port != DEFAULT_PORT else "")

    async def _resolve_again(self) -> None:
        """A peer on dynamic DNS may have moved since the last link: look its name up again."""
        host = self.config.peer_host
        if host is None:
            return
        try:
            ip = await resolve_peer_host_async(host, family_of(self.config.peer_ip))
        except TeteError as exc:
            log.warning("%s; punching to %s as before", exc, self.config.peer_ip)
            return
        if ip != self.config.peer_ip and family_of(ip) == family_of(self.config.peer_ip):
            log.warning("%s now resolves to %s (was %s)", host, ip, self.config.peer_ip)
            self.config = dataclasses.replace(self.config, peer_ip=ip)

    def waiting_for(self) -> str:
        """What a person waits for while we connect (the terminal's status line)."""
        return f"the peer at {endpoint(self.config.peer_ip, self.config.peer_port)}"

    async def connect(self, deadline: float | None) -> SecureLink:
        """An authenticated link; PunchError at `deadline` (loop clock; None: no limit).

        Our dials and the connections that reach our listener from the peer's address are
        handshaken at once, up to MAX_HANDSHAKES together: a stranger that stalls, or several,
        never keep the real peer out. The first link that authenticates wins.
        """
        if self.attempted:
            await self._resolve_again()
        self.attempted = True
        config = self.config
        auth = config.auth if self.pinned is None else Auth(peer_fingerprint=self.pinned)
        log.info(
            "punching from port %d to %s%s",
            config.local_port,
            endpoint(config.peer_ip, config.peer_port),
            f" (timeout {config.timeout:g}s)" if deadline is not None else "",
        )
        drops = _Drops()
        punch = Punch(
            self.identity,
            auth,
            config.local_port,
            [(config.peer_ip, config.peer_port)],
            config.keepalive,
            drops,
        )
        try:
            link = await punch.run(deadline)
        finally:
            drops.flush()
            self.codes_drawn += punch.codes_drawn
        if link is None:
            failure = PunchError(
                no_peer_message(config.peer_ip, config.peer_port, config.local_port, punch.attempts)
            )
            raise self.explain(failure, punch.attempts, drops, punch.stalled)
        announce(self, link)
        return link

    def explain(
        self,
        exc: PunchError,
        attempts: Attempts,
        drops: _Drops,
        stalled: list[tuple[str, bool]],
    ) -> PunchError:
        """What punching saw, most telling first, for the message at the deadline.
        `stalled`: connections still in their handshake then (and whether we dialed them)."""
        config = self.config
        where = endpoint(config.peer_ip, config.peer_port)
        for kind in ("wrong-id", "refused-id", "code-mismatch", "same-identity", "refused"):
            if kind in drops.kinds:
                n = drops.kinds[kind]
                return PunchError(
                    f"no peer was linked in time: a peer at {config.peer_ip} was dropped "
                    f"{n} time{'s' if n != 1 else ''}: {drops.last_reason[kind]}"
                )
        if "not-a-peer" in drops.kinds:
            n = drops.kinds["not-a-peer"]
            return PunchError(
                f"something else answers at {where} ({n} time{'s' if n != 1 else ''}; "
                f"{drops.last_reason['not-a-peer']}): a wrong --rport? It is the port the "
                "peer punches from (its --lport), as its NAT shows it"
            )
        if any(dialed for _, dialed in stalled):
            return PunchError(
                f"something at {where} accepted our connection but sent no tete-tunnel "
                "handshake before the deadline: a wrong --rport? It is the port the peer "
                "punches from (its --lport), as its NAT shows it"
            )
        if stalled:
            return PunchError(
                f"no peer was linked in time: {len(stalled)} connection(s) from "
                f"{config.peer_ip} were still in their handshake at the deadline, sending "
                "nothing that completes it"
            )
        if drops.total and attempts.dials:
            return PunchError(
                no_peer_message(config.peer_ip, config.peer_port, config.local_port, attempts)
                + f"; {drops.total} connection(s) were dropped, the last: "
                + drops.last_reason.get("other", "")
            )
        return exc


class Pinning(Protocol):
    """What announce() needs of a connector: who the peer is, once known."""

    pinned: bytes | None
    codes_drawn: int

    def save_hint(self) -> str: ...


def announce(connector: Pinning, link: SecureLink) -> None:
    """The first link fixes the peer (pinned from then on) and says what to check or pin."""
    if connector.pinned is not None:
        return
    connector.pinned = link.peer_fingerprint
    if link.mode is Mode.UNVERIFIED:
        log.warning(
            "WARNING: the peer is not verified (no --peer-id or --code): the link is "
            "encrypted, but someone in the middle could read it. Compare this safety "
            "code with your peer by voice: safety code %s (the same on both sides "
            "means no one is in the middle)",
            link.safety_code,
        )
        if connector.codes_drawn:
            log.warning(
                "WARNING: before this link, %d handshake(s) from the peer's address failed "
                "after a safety code was drawn: someone in the middle may be trying to "
                "match the codes. Tell your peer this number too: on an honest link it "
                "is 0 or 1 on both sides; if it is larger, do not trust this link",
                connector.codes_drawn,
            )
    if link.mode is not Mode.PEER_ID:
        log.warning("peer ID: %s (pin it next time with --peer-id %s)", link.peer_id, link.peer_id)
        log.warning(
            "save it as a named peer (pick a NAME), then use --peer NAME: "
            "tete-tunnel peers add NAME %s %s",
            link.peer_id,
            connector.save_hint(),
        )
    else:
        # The peer may not have pinned us: then it shows this code too and may ask its user
        # to compare it with ours before it serves the link.
        log.warning(
            "the peer is verified by its ID; its safety code is %s (if the peer did not pin "
            "our ID, it may ask whether we see the same)",
            link.safety_code,
        )


class Punch:
    """One wait for a link: dialers (one per candidate address of the peer), an acceptor,
    and the handshakes they start, all owned here. The first link that authenticates wins.

    `run(deadline)` returns it, or None at the deadline; raises CodeGuessFailed when a code
    guess was tried and missed, PunchError when a dial cannot go on at all.
    """

    def __init__(
        self,
        identity: Identity,
        auth: Auth,
        local_port: int,
        candidates: list[tuple[str, int]],
        keepalive: Keepalive | None,
        drops: _Drops,
    ) -> None:
        self.identity = identity
        self.auth = auth
        self.local_port = local_port
        self.candidates = candidates
        self.keepalive = keepalive
        self.drops = drops
        self.attempts = Attempts()
        self.family = family_of(candidates[0][0])
        self.codes_drawn = 0  # handshakes that failed after our nonce went out
        self.arbiter = Arbiter()  # several connections to the peer: one goes on
        self.won: asyncio.Future[SecureLink] = asyncio.get_running_loop().create_future()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.in_flight: dict[asyncio.Task[None], tuple[str, bool]] = {}  # far end, dialed

        # Connections still in their handshake at the deadline (and whether we dialed them).
        self.stalled: list[tuple[str, bool]] = []

    async def run(self, deadline: float | None, finish_in_flight: float = 0.0) -> SecureLink | None:
        """`finish_in_flight`: at the deadline, handshakes under way may finish within this."""
        loop = asyncio.get_running_loop()
        listener = listen(self.family, self.local_port)
        also = tuple(self.candidates[1:])
        workers = [
            *(asyncio.ensure_future(_Dialer(self, c).run()) for c in self.candidates),
            asyncio.ensure_future(self._accept(listener, also)),
        ]
        handed_over = False
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(
                [self.won, *workers], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for worker in workers:
                if worker in done:
                    worker.result()  # a dial that cannot go on (PunchError) ends the wait
            if not self.won.done() and self.handshakes and finish_in_flight > 0:
                for worker in workers:  # no new attempts; the ones under way may finish
                    worker.cancel()
                in_flight = asyncio.ensure_future(asyncio.wait(list(self.handshakes)))
                await asyncio.wait(
                    [self.won, in_flight],
                    timeout=finish_in_flight,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                in_flight.cancel()
            if not self.won.done():
                self.stalled = list(self.in_flight.values())
                return None
            link = self.won.result()
            self.drops.flush()  # the count belongs before the new link's lines
            handed_over = True
            return link
        finally:
            listener.close()
            for task in (*workers, *self.handshakes):
                task.cancel()
            await asyncio.gather(*workers, *self.handshakes, return_exceptions=True)
            if not self.won.done():
                self.won.cancel()
            elif not self.won.cancelled() and self.won.exception() is None and not handed_over:
                _close_link(self.won.result())  # we were cancelled with a link in hand

    async def _accept(self, listener: socket.socket, also: tuple[tuple[str, int], ...]) -> None:
        while True:
            sock = await accept_peer(listener, self.candidates[0], self.attempts, also)
            if len(self.handshakes) >= MAX_HANDSHAKES:
                self.drops.add(
                    _peer_name(sock), HandshakeError(f"{MAX_HANDSHAKES} handshakes at once already")
                )
                sock.close()
                continue
            self.start(sock, None)

    def start(self, sock: socket.socket, dialer: _Dialer | None) -> None:
        task = asyncio.ensure_future(self._handshake(sock, dialer))
        self.handshakes.add(task)
        self.in_flight[task] = (_peer_name(sock), dialer is not None)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.handshakes.discard(task)
        self.in_flight.pop(task, None)

    async def _handshake(self, sock: socket.socket, dialer: _Dialer | None) -> None:
        far = _peer_name(sock)
        progress = Progress()
        try:
            if self.keepalive is not None:
                tune_link_socket(sock, self.keepalive.interval, self.keepalive.timeout)
            try:
                async with asyncio.timeout(PREAUTH_TIMEOUT):
                    link = await secure(sock, self.identity, self.auth, progress, self.arbiter)
            except TimeoutError:
                if progress.code_spent:
                    raise CodeGuessFailed(
                        WRONG_CODE.format(what="the peer went silent after its code message")
                    ) from None
                raise HandshakeError("it sent no complete handshake in time") from None
        except Duplicate:  # the peer goes on with another of our connections: all is well
            sock.close()
            if dialer is not None:
                dialer.free.set()
            return
        except (HandshakeError, OSError) as exc:
            sock.close()
            if progress.nonce_revealed and self.auth.mode is Mode.UNVERIFIED:
                self.codes_drawn += 1
            error = exc if isinstance(exc, HandshakeError) else HandshakeError(str(exc))
            self.drops.add(far, error)
            if dialer is not None:
                dialer.failed()
            return
        except AuthenticationError as exc:  # a code guess tried and missed: the run ends
            sock.close()
            if not self.won.done():
                self.won.set_exception(exc)
            return
        except BaseException:
            sock.close()
            raise
        if self.won.done():
            _close_link(link)  # a second link at once: the first one won
            return
        self.won.set_result(link)


class _Dialer:
    """Dials one candidate address of the peer from our port, paced; one at a time, as a
    dialed connection holds that 4-tuple."""

    def __init__(self, punch: Punch, address: tuple[str, int]) -> None:
        self.punch = punch
        self.address = address
        self.free = asyncio.Event()  # no connection of ours to it is being handshaken
        self.free.set()
        self.pause_until = 0.0
        self.backoff = HANDSHAKE_BACKOFF

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        punch = self.punch
        while True:
            await self.free.wait()
            pause = self.pause_until - loop.time()
            if pause > 0:  # after a dialed handshake failed: whatever answers is not hammered
                await asyncio.sleep(pause)
                continue
            sock = await dial_once(punch.family, punch.local_port, self.address, punch.attempts)
            if sock is None:
                await asyncio.sleep(punch.attempts.pause())
                continue
            self.free.clear()
            punch.start(sock, self)

    def failed(self) -> None:
        """Its connection failed the handshake: wait longer before the next dial."""
        self.pause_until = asyncio.get_running_loop().time() + self.backoff
        self.backoff = min(MAX_HANDSHAKE_BACKOFF, self.backoff * 2)
        self.free.set()


def _close_link(link: SecureLink) -> None:
    if link.carrier.transport is not None:
        link.carrier.transport.abort()


def _peer_name(sock: socket.socket) -> str:
    try:
        return endpoint(*sock.getpeername()[:2])
    except OSError:
        return "a peer that vanished"
