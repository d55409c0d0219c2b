"""Addresses and sockets as every layer needs them: how to write an endpoint, which family
an address is, who holds a port, and a listening socket with a clear error."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass

from tete_tunnel.errors import TeteError, UsageError


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


def unmapped(ip: str) -> str:
    """An IPv4-mapped IPv6 address (what a dual-stack socket reports) as plain IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return ip


def ip_version(ip: str) -> int:
    return ipaddress.ip_address(unmapped(ip).split("%", 1)[0]).version


def is_local_address(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback or addr.is_unspecified:
        return True
    import psutil  # here, not above: the few commands that need it pay its memory

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
    import psutil

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


def in_use_message(port: int) -> str:
    holder = port_holder(port)
    return f"the port is already in use by {holder}" if holder else "the port is already in use"


@dataclass(frozen=True)
class Address:
    """One resolved address of a host: what to bind or connect, and its family."""

    family: socket.AddressFamily
    sockaddr: tuple

    @property
    def ip(self) -> str:
        return str(self.sockaddr[0])


def is_ip_literal(host: str) -> bool:
    """`host` is an IP address (resolve() answers it without a resolver)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int, *, passive: bool = False) -> list[Address]:
    """Addresses for host:port; an IP literal needs no resolver (asyncio would use a thread)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if ip.version == 6:
            return [Address(socket.AF_INET6, (host, port, 0, 0))]
        return [Address(socket.AF_INET, (host, port))]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0
        )
    except socket.gaierror as exc:
        raise TeteError(f"cannot resolve {host}: {exc.strerror}") from exc
    return [Address(family, address) for family, _, _, _, address in infos]


def listen_on(address: Address, backlog: int) -> socket.socket:
    """A listening non-blocking socket on exactly `address`; a taken port names its holder."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = endpoint(address.ip, address.sockaddr[1])
        if exc.errno == errno.EADDRINUSE:
            message = f"cannot listen on {where}: {in_use_message(address.sockaddr[1])}"
            raise TeteError(message) from exc
        raise TeteError(f"cannot listen on {where}: {exc.strerror}") from exc
    return sock


def resolve_peer_host(host: str, prefer: socket.AddressFamily | None = None) -> str:
    """The IP to punch to for --peer-ip HOST (a literal is returned as it is).

    Punching needs one address of one family: `prefer`'s family if the name has one, else
    IPv4 (where NATs and hole punching live), else the first answer. Blocking: called at
    start, before the event loop; reconnects use `resolve_peer_host_async`.
    """
    return _pick(host, prefer, _getaddrinfo(host))


async def resolve_peer_host_async(host: str, prefer: socket.AddressFamily | None = None) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise TeteError(f"cannot resolve --peer-ip {host}: {why}") from exc
    return _pick(host, prefer, infos)


def _getaddrinfo(host: str) -> list:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [(family_of(host), socket.SOCK_STREAM, 0, "", (host, 0))]
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid name"
        raise UsageError(
            f"--peer-ip: not an IP address: {host!r}, nor a host name that resolves ({why})"
        ) from exc


def _pick(host: str, prefer: socket.AddressFamily | None, infos: list) -> str:
    found = [(family, address[0]) for family, _, _, _, address in infos]
    if not found:
        raise TeteError(f"cannot resolve --peer-ip {host}: no address")
    for wanted in (prefer, socket.AF_INET):
        for family, ip in found:
            if family == wanted:
                return str(ip)
    return str(found[0][1])
