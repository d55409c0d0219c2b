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
import ipaddress
import logging
import socket

import psutil

from tete_tunnel.errors import PunchError, UsageError

log = logging.getLogger("tete_tunnel")

ATTEMPT_TIMEOUT = 3.0  # one dial; the kernel retransmits the SYN at 1 s and 3 s within it
RETRY_PAUSE = 0.2  # after a refused or failed dial: quick enough to catch the peer's SYN
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


def endpoint(ip: str, port: int) -> str:
    """`1.2.3.4:5` or `[::1]:5`, as people write them."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def family_of(ip: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    except ValueError:
        raise UsageError(f"not an IP address: {ip!r}") from None


def same_ip(a: str, b: str) -> bool:
    """Compare addresses as numbers (IPv4-mapped IPv6 equals its IPv4; scope ids ignored)."""
    x = ipaddress.ip_address(a.split("%", 1)[0])
    y = ipaddress.ip_address(b.split("%", 1)[0])
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped:
        y = y.ipv4_mapped
    return x == y


def is_local_address(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback or addr.is_unspecified:
        return True
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if same_ip(a.address, ip):
                        return True
                except ValueError:
                    continue
    return False


def port_holder(port: int) -> str | None:
    """Name the process that holds a local TCP port, if the OS lets us see it."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        return None
    return None


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


class _Attempts:
    """What went wrong so far, to explain a failure at the deadline."""

    def __init__(self) -> None:
        self.dials = 0
        self.last_error = "no answer"


async def _dial_loop(
    family: socket.AddressFamily, local_port: int, peer: tuple[str, int], attempts: _Attempts
) -> socket.socket:
    while True:
        sock = _bound_socket(family, local_port)
        attempts.dials += 1
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
            return sock
        sock.close()  # still in SYN_SENT or failed: closing sends no RST on a live 4-tuple
        await asyncio.sleep(RETRY_PAUSE)


async def _accept_loop(listener: socket.socket, peer: tuple[str, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    while True:
        conn, addr = await loop.sock_accept(listener)
        if not same_ip(addr[0], peer[0]):
            log.info("ignored a connection from %s (not the peer's address)", endpoint(*addr[:2]))
            conn.close()
            continue
        if addr[1] != peer[1]:
            log.info(
                "the peer connected from port %d, not %d: its NAT rewrites ports", addr[1], peer[1]
            )
        log.info("connected by accepting %s", endpoint(*addr[:2]))
        return conn


async def punch(peer_ip: str, peer_port: int, local_port: int, deadline: float) -> socket.socket:
    """Return a connected non-blocking socket to the peer, or raise PunchError at `deadline`.

    `deadline` is in the running loop's clock (`loop.time()`).
    """
    family = family_of(peer_ip)
    peer = (peer_ip, peer_port)
    attempts = _Attempts()
    listener = _bound_socket(family, local_port)
    tasks: list[asyncio.Task[socket.socket]] = []
    try:
        listener.listen(LISTEN_BACKLOG)
        tasks = [
            asyncio.create_task(_accept_loop(listener, peer)),
            asyncio.create_task(_dial_loop(family, local_port, peer, attempts)),
        ]
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
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
    raise PunchError(
        f"could not connect to the peer at {endpoint(peer_ip, peer_port)} "
        f"from local port {local_port} in time "
        f"({attempts.dials} dials, last: {attempts.last_error}). "
        "Likely causes: the peer has not started (both sides must run within "
        "the --timeout), a wrong --peer-ip or --rport (they are the peer's public "
        "address and its --lport), or a NAT that changes ports (symmetric NAT), "
        "which direct punching cannot pass"
    )


def enable_keepalive(
    sock: socket.socket, idle: int = 15, interval: int = 5, count: int = 3
) -> None:
    """TCP keepalive so a dead peer or a dropped NAT mapping is noticed (after ~30 s)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
