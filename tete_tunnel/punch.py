"""TCP simultaneous open: listen on our port and dial the peer from it, at once.

Both NATs see an outgoing SYN from each side, so each opens a mapping that lets the other's
SYN in; whichever way the connection forms (our dial, their dial reaching our listener, or
both SYNs crossing) it is one TCP connection between the same two ports. Everything is
non-blocking, every dial attempt is a fresh socket with its own time limit, and errors are
judged by errno, never by message text.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from dataclasses import dataclass, field

from tete_tunnel.errors import PunchError
from tete_tunnel.net import endpoint, family_of, ip_version, port_holder, same_ip, unmapped

log = logging.getLogger("tete_tunnel")

ATTEMPT_TIMEOUT = 3.0  # one dial; the kernel retransmits the SYN at 1 s and 3 s within it
RETRY_PAUSE = 0.2  # after a refused or failed dial: quick enough to catch the peer's SYN
# Successive failed dials wait longer, up to this: a peer that is away for long (a restart,
# a reconnect) costs a few dials a minute, and both sides' attempts still overlap.
MAX_RETRY_PAUSE = 2.0
LISTEN_BACKLOG = 8  # only the peer is wanted; strangers are closed at once

# Dial failures that only mean "not yet": the peer is not up, its NAT refused or dropped
# our SYN, or the 4-tuple is still held by a connection the listener just accepted.
RETRY_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EADDRNOTAVAIL,
        errno.EADDRINUSE,
        errno.EPERM,  # a local firewall rule; may be lifted
        errno.EACCES,
    }
)
CONNECTED_ERRNOS = frozenset({0, errno.EISCONN})


def _bound_socket(family: socket.AddressFamily, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            who = f" by {holder}" if holder else ""
            raise PunchError(
                f"local port {port} is already in use{who}; choose another with --lport"
            ) from exc
        if exc.errno == errno.EACCES:
            raise PunchError(
                f"not allowed to use local port {port}; choose one above 1023 with --lport"
            ) from exc
        raise PunchError(f"cannot bind local port {port}: {exc.strerror}") from exc
    return sock


def listen(family: socket.AddressFamily, port: int) -> socket.socket:
    """The listening half of punching, on the port we also dial from."""
    listener = _bound_socket(family, port)
    try:
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


async def _connect(sock: socket.socket, address: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    err = sock.connect_ex(address)
    if err in CONNECTED_ERRNOS:
        return
    if err != errno.EINPROGRESS:
        raise OSError(err, errno.errorcode.get(err, str(err)))
    writable = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err not in CONNECTED_ERRNOS:
        raise OSError(err, errno.errorcode.get(err, str(err)))


@dataclass
class Attempts:
    """What punching saw so far, across calls, to explain a failure at the deadline."""

    dials: int = 0
    last_error: str = "no answer"
    failures_in_a_row: int = 0  # dials since the last one that connected
    strangers: dict[str, int] = field(default_factory=dict)  # other addresses that came

    def pause(self) -> float:
        """How long to wait before the next dial: doubling from RETRY_PAUSE to the cap."""
        return min(MAX_RETRY_PAUSE, RETRY_PAUSE * 2 ** min(self.failures_in_a_row - 1, 8))


async def dial_once(
    family: socket.AddressFamily, local_port: int, peer: tuple[str, int], attempts: Attempts
) -> socket.socket | None:
    """One dial from our port: the connected socket, or None after a failure worth retrying
    (recorded in `attempts`; the caller waits `attempts.pause()` before the next)."""
    sock = _bound_socket(family, local_port)
    attempts.dials += 1
    attempts.failures_in_a_row += 1
    try:
        async with asyncio.timeout(ATTEMPT_TIMEOUT):
            await _connect(sock, peer)
    except TimeoutError:
        attempts.last_error = "no answer (SYN dropped)"
        log.debug("dial %d to %s: no answer", attempts.dials, endpoint(*peer))
    except OSError as exc:
        if exc.errno not in RETRY_ERRNOS:
            sock.close()
            raise PunchError(f"cannot dial {endpoint(*peer)}: {exc.strerror or exc}") from exc
        attempts.last_error = errno.errorcode.get(exc.errno or 0, str(exc))
        log.debug("dial %d to %s: %s", attempts.dials, endpoint(*peer), attempts.last_error)
    except BaseException:
        sock.close()
        raise
    else:
        log.info("connected by dialing %s", endpoint(*peer))
        attempts.failures_in_a_row = 0
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock.close()  # still in SYN_SENT or failed: closing sends no RST on a live 4-tuple
    return None


async def _dial_loop(
    family: socket.AddressFamily, local_port: int, peer: tuple[str, int], attempts: Attempts
) -> socket.socket:
    while True:
        sock = await dial_once(family, local_port, peer, attempts)
        if sock is not None:
            return sock
        await asyncio.sleep(attempts.pause())


async def accept_peer(
    listener: socket.socket,
    peer: tuple[str, int],
    attempts: Attempts,
    also: tuple[tuple[str, int], ...] = (),
) -> socket.socket:
    """The next connection to our port from the peer's address (or one of `also`, the other
    addresses it may come from); others are closed at once."""
    loop = asyncio.get_running_loop()
    peers = (peer, *also)
    while True:
        conn, addr = await loop.sock_accept(listener)
        match = next((p for p in peers if same_ip(addr[0], p[0])), None)
        if match is None:
            seen = attempts.strangers.get(addr[0], 0)
            attempts.strangers[addr[0]] = seen + 1
            if not seen:
                log.info(
                    "ignored a connection from %s (not the peer's address)", endpoint(*addr[:2])
                )
            conn.close()
            continue
        if addr[1] != match[1] and not also:
            log.info(
                "the peer connected from port %d, not %d: its NAT rewrites ports",
                addr[1],
                match[1],
            )
        log.info("connected by accepting %s", endpoint(*addr[:2]))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


async def punch(
    peer_ip: str,
    peer_port: int,
    local_port: int,
    deadline: float | None,
    attempts: Attempts | None = None,
    listener: socket.socket | None = None,
) -> socket.socket:
    """Return a connected non-blocking socket to the peer, or raise PunchError at `deadline`.

    `deadline` is in the running loop's clock (`loop.time()`); None: no deadline. Pass the
    same `attempts` to successive calls so that dials are counted and paced across them, and
    a `listener` from `listen()` to keep listening between calls (else one is made here).
    """
    family = family_of(peer_ip)
    peer = (peer_ip, peer_port)
    attempts = attempts if attempts is not None else Attempts()
    own_listener = listener is None
    if listener is None:
        listener = listen(family, local_port)
    tasks: list[asyncio.Task[socket.socket]] = []
    try:
        tasks = [
            asyncio.create_task(accept_peer(listener, peer, attempts)),
            asyncio.create_task(_dial_loop(family, local_port, peer, attempts)),
        ]
        now = asyncio.get_running_loop().time()
        timeout = None if deadline is None else max(0.0, deadline - now)
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if own_listener:
            listener.close()
    winners = [r for r in results if isinstance(r, socket.socket)]
    for loser in winners[1:]:
        loser.close()
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            for w in winners:
                w.close()
            raise r
    if winners:
        sock = winners[0]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise PunchError(no_peer_message(peer_ip, peer_port, local_port, attempts))


def no_peer_message(peer_ip: str, peer_port: int, local_port: int, attempts: Attempts) -> str:
    """Why punching found no peer, with the most likely mistake first."""
    where = endpoint(peer_ip, peer_port)
    dials = f"{attempts.dials} dial{'s' if attempts.dials != 1 else ''}"
    text = (
        f"could not connect to the peer at {where} from local port {local_port} in time "
        f"({dials}, last: {attempts.last_error})."
    )
    other_family = [ip for ip in attempts.strangers if ip_version(ip) != ip_version(peer_ip)]
    if other_family:
        return (
            f"{text} Connections came from {unmapped(other_family[0])} instead: IPv4 on one "
            "side and IPv6 on the other? Give both sides addresses of the same IP version "
            "(--peer-ip)"
        )
    return (
        f"{text} Likely causes: the peer has not started (both sides must run within "
        "the --timeout), a wrong --peer-ip or --rport (they are the peer's public "
        "address and its --lport), or a NAT that changes ports (symmetric NAT), "
        "which direct punching cannot pass"
    )


def tune_link_socket(sock: socket.socket, interval: float, timeout: float) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT matching the application's keepalive, so the
    kernel also gives up on a peer that stopped acknowledging.

    The kernel's limit is one interval later than ours on purpose: our keepalive then
    declares the link dead first and closes it with RST, which passes our own NAT and moves
    its connection tracking out of ESTABLISHED. A socket the kernel gave up on sends no RST,
    and a NAT that still holds the old 4-tuple as ESTABLISHED drops the SYNs of the next
    punch from the same ports as invalid (Linux conntrack: SYN in the reply direction).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, round(interval))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
    probes = max(1, math.ceil(timeout / idle) + 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        limit = int((timeout + interval) * 1000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, limit)
