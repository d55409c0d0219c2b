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
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tete_tunnel.errors import AuthenticationError, HandshakeError, PunchError, UsageError
from tete_tunnel.hello import NotAPeer
from tete_tunnel.identity import Identity
from tete_tunnel.net import endpoint, family_of, is_local_address
from tete_tunnel.punch import Attempts, listen, no_peer_message, punch, tune_link_socket
from tete_tunnel.secure import PREAUTH_TIMEOUT, Auth, Mode, SecureLink, secure
from tete_tunnel.session import Keepalive

log = logging.getLogger("tete_tunnel")

DEFAULT_PORT = 54312
DEFAULT_TIMEOUT = 30.0
# After a connection from the peer's address fails its handshake, wait before the next
# dial: doubling from the first pause to the cap, reset by a good link.
HANDSHAKE_BACKOFF = 0.5
MAX_HANDSHAKE_BACKOFF = 5.0


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
        self.not_a_peer = 0
        self.last_reason = ""

    def add(self, far: str, error: Exception) -> None:
        self.total += 1
        self.last_reason = str(error)
        if isinstance(error, NotAPeer):
            self.not_a_peer += 1
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
        self.links = 0

    def describe(self) -> str:
        return "direct"

    async def connect(self, deadline: float | None) -> SecureLink:
        """An authenticated link; PunchError at `deadline` (loop clock; None: no limit).

        Before the first link, authentication follows the flags and a peer that fails it
        ends the run (AuthenticationError). Afterwards the first peer's ID is required.
        """
        config = self.config
        loop = asyncio.get_running_loop()
        attempts = Attempts()
        drops = _Drops()
        backoff = HANDSHAKE_BACKOFF
        auth = config.auth if self.pinned is None else Auth(peer_fingerprint=self.pinned)
        log.info(
            "punching from port %d to %s%s",
            config.local_port,
            endpoint(config.peer_ip, config.peer_port),
            f" (timeout {config.timeout:g}s)" if deadline is not None else "",
        )
        # One listener for the whole wait: a peer (or stranger) that comes while we pause
        # after a failed handshake waits in its backlog instead of being refused.
        listener = listen(family_of(config.peer_ip), config.local_port)
        try:
            while True:
                try:
                    sock = await punch(
                        config.peer_ip,
                        config.peer_port,
                        config.local_port,
                        deadline,
                        attempts,
                        listener,
                    )
                except PunchError as exc:
                    raise self._explain(exc, attempts, drops) from exc
                far = _peer_name(sock)
                try:
                    link = await self._authenticate(sock, auth)
                except (HandshakeError, AuthenticationError) as exc:
                    sock.close()
                    if isinstance(exc, AuthenticationError) and self.pinned is None:
                        raise
                    drops.add(far, exc)
                    pause = backoff
                    backoff = min(MAX_HANDSHAKE_BACKOFF, backoff * 2)
                    if deadline is not None:
                        pause = min(pause, max(0.0, deadline - loop.time()))
                    await asyncio.sleep(pause)
                    continue
                except BaseException:
                    sock.close()
                    raise
                self._announce(link)
                return link
        finally:
            listener.close()
            drops.flush()

    async def _authenticate(self, sock: socket.socket, auth: Auth) -> SecureLink:
        keepalive = self.config.keepalive
        if keepalive is not None:
            tune_link_socket(sock, keepalive.interval, keepalive.timeout)
        try:
            async with asyncio.timeout(PREAUTH_TIMEOUT):
                return await secure(sock, self.identity, auth)
        except TimeoutError:
            raise HandshakeError("it sent no complete handshake in time") from None

    def _explain(self, exc: PunchError, attempts: Attempts, drops: _Drops) -> PunchError:
        config = self.config
        where = endpoint(config.peer_ip, config.peer_port)
        if drops.not_a_peer:
            times = f"{drops.not_a_peer} time{'s' if drops.not_a_peer != 1 else ''}"
            return PunchError(
                f"something else answers at {where} ({times}; {drops.last_reason}): a wrong "
                "--rport? It is the port the peer punches from (its --lport), as its NAT "
                "shows it"
            )
        if drops.total and attempts.dials:
            return PunchError(
                no_peer_message(config.peer_ip, config.peer_port, config.local_port, attempts)
                + f"; {drops.total} connection(s) were dropped, the last: {drops.last_reason}"
            )
        return exc

    def _announce(self, link: SecureLink) -> None:
        self.links += 1
        if self.pinned is None:
            self.pinned = link.peer_fingerprint
            if link.mode is Mode.UNVERIFIED:
                log.warning(
                    "WARNING: the peer is not verified (no --peer-id or --code): the link is "
                    "encrypted, but someone in the middle could read it. Compare this safety "
                    "code with your peer by voice: safety code %s (the same on both sides "
                    "means no one is in the middle)",
                    link.safety_code,
                )
            if link.mode is not Mode.PEER_ID:
                log.warning(
                    "peer ID: %s (pin it next time with --peer-id %s)", link.peer_id, link.peer_id
                )


def _peer_name(sock: socket.socket) -> str:
    try:
        return endpoint(*sock.getpeername()[:2])
    except OSError:
        return "a peer that vanished"
