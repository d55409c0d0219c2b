"""What the peer may make us do: which targets we connect to, where we listen.

OpenSSH's PermitOpen / PermitListen / GatewayPorts are the model. By default a peer may
make us connect only to loopback targets and listen only on our loopback; patterns widen
that. Checked on every open, after name resolution, and the connection then goes to the
addresses that were checked (a name cannot change its answer in between). A target given
as an IP address gets the same verdict every time; `forward` remembers it.

Pattern syntax: `host:port`, `host:*` (any port), `*:port` (any host), `[v6addr]:port`,
or `any` (everything).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tete_tunnel.errors import UsageError


@dataclass(frozen=True)
class Pattern:
    host: str | None  # None: any host
    port: int | None  # None: any port

    def matches(self, host: str, port: int, addresses: list[str]) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is None:
            return True
        if self.host.lower() == host.lower():
            return True
        try:
            mine = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return all(ipaddress.ip_address(a) == mine for a in addresses) and bool(addresses)


def parse_pattern(text: str, option: str) -> Pattern:
    if text.strip().lower() == "any":
        return Pattern(None, None)
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise UsageError(
            f"{option} {text!r}: expected host:port, host:*, *:port or any "
            "(IPv6 in brackets: [::1]:22)"
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if port == "*":
        port_value = None
    else:
        try:
            port_value = int(port)
        except ValueError:
            raise UsageError(f"{option} {text!r}: port must be a number or *") from None
        if not 0 < port_value < 65536:
            raise UsageError(f"{option} {text!r}: port {port_value} is not a TCP port")
    return Pattern(None if host == "*" else host, port_value)


def is_loopback(addresses: list[str]) -> bool:
    """Every address is a loopback one (a name is never trusted: only what it resolved to)."""
    if not addresses:
        return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


@dataclass(frozen=True)
class Policy:
    allow_open: tuple[Pattern, ...] = field(default_factory=tuple)
    allow_listen: tuple[Pattern, ...] = field(default_factory=tuple)

    def open_refusal(self, host: str, port: int, addresses: list[str]) -> str | None:
        """None if the peer may make us connect to host:port (resolved to `addresses`)."""
        if is_loopback(addresses):
            return None
        if any(p.matches(host, port, addresses) for p in self.allow_open):
            return None
        return (
            f"connecting to {host}:{port} is not allowed on the peer (only loopback targets "
            f"by default; it can allow this with --allow-open {host}:{port})"
        )

    def listen_refusal(self, host: str, port: int, addresses: list[str]) -> str | None:
        """None if the peer may make us listen on host:port (resolved to `addresses`, every
        one of which is checked; the caller binds one of those, never the name again)."""
        if is_loopback(addresses):
            return None
        if any(p.matches(host, port, addresses) for p in self.allow_listen):
            return None
        return (
            f"listening on {host}:{port} is not allowed on the peer (only loopback by "
            f"default; it can allow this with --allow-listen {host}:{port})"
        )
