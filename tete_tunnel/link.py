"""The secure link: punch, then authenticate; a stranger on the port does not end the wait.

Connection options shared by every command live here as one frozen config, so `pipe`,
`forward` and tests build links the same way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tete_tunnel import log as logmod
from tete_tunnel.errors import HandshakeError, PunchError, UsageError
from tete_tunnel.identity import Identity, load_or_create
from tete_tunnel.punch import enable_keepalive, endpoint, family_of, is_local_address, punch
from tete_tunnel.secure import PREAUTH_TIMEOUT, Auth, Mode, SecureLink, secure

log = logging.getLogger("tete_tunnel")

DEFAULT_PORT = 54312
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class LinkConfig:
    peer_ip: str
    local_port: int = DEFAULT_PORT
    peer_port: int = DEFAULT_PORT
    my_ip: str | None = None
    auth: Auth = field(default_factory=Auth)
    identity_dir: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    keepalive: bool = False

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
        if self.local_port == self.peer_port and is_local_address(self.peer_ip):
            raise UsageError(
                f"--peer-ip {self.peer_ip} is this machine and --lport equals --rport "
                f"({self.local_port}): the socket would connect to itself; use two ports"
            )


async def establish(config: LinkConfig, identity: Identity | None = None) -> SecureLink:
    """Punch and authenticate until a real peer is linked, or the deadline passes."""
    config.check()
    identity = identity or load_or_create(config.identity_dir)
    log.info("our ID: %s", identity.id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.timeout
    log.info(
        "punching from port %d to %s (timeout %gs)",
        config.local_port,
        endpoint(config.peer_ip, config.peer_port),
        config.timeout,
    )
    last_rejection: HandshakeError | None = None
    while True:
        try:
            sock = await punch(config.peer_ip, config.peer_port, config.local_port, deadline)
        except PunchError as exc:
            if last_rejection is not None and loop.time() >= deadline:
                raise PunchError(
                    f"{exc}; the last connection was refused: {last_rejection}"
                ) from exc
            raise
        if config.keepalive:
            enable_keepalive(sock)
        far = _peer_name(sock)
        try:
            async with asyncio.timeout(PREAUTH_TIMEOUT):
                link = await secure(sock, identity, config.auth)
        except TimeoutError:
            last_rejection = HandshakeError(f"{far} sent no complete handshake in time")
        except HandshakeError as exc:
            last_rejection = exc
        except BaseException:
            sock.close()
            raise
        else:
            _announce(link)
            return link
        sock.close()
        log.warning("dropped a connection from %s: %s", far, last_rejection)


def _peer_name(sock: socket.socket) -> str:
    try:
        return endpoint(*sock.getpeername()[:2])
    except OSError:
        return "a peer that vanished"


def _announce(link: SecureLink) -> None:
    if link.mode is Mode.UNVERIFIED:
        log.warning(
            "WARNING: the peer is not verified (no --peer-id or --code): the link is encrypted, "
            "but someone in the middle could read it. Compare this safety code with your peer "
            "by voice: safety code %s (the same on both sides means no one is in the middle)",
            link.safety_code,
        )
    if link.mode is not Mode.PEER_ID:
        log.warning("peer ID: %s (pin it next time with --peer-id %s)", link.peer_id, link.peer_id)
    logmod.event("Connected to peer!")
