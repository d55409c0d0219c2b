"""`tete-tunnel netcheck --via RELAY`: what our network means for a direct link, like
`tailscale netcheck`.

Two whoami connections leave the same local port (--lport, the one we punch from) for the
relay's two ports (docs/PROTOCOL.md §10):

    local port P --> relay:PORT    observed ip:X   X == P: the NAT keeps our port
    local port P --> relay:PORT2   observed ip:Y   Y == X: one mapping for every destination
                                                   (endpoint-independent: punching works)
                                                   Y != X: a new port per destination
                                                   (symmetric: expect to be relayed)

The probing is `probe()`; what the answers mean is `describe()`, a plain function of them.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from dataclasses import dataclass
from typing import Any

from tete_tunnel import rendezvous as rv
from tete_tunnel.errors import TeteError
from tete_tunnel.net import endpoint, in_use_message, same_ip, unmapped
from tete_tunnel.via import RELAY_CONNECT_TIMEOUT, Control, connect_to, why

# An address that only has to be routable: a UDP connect() to it sends no packet, it only
# asks the routing table whether we have an IPv6 route to the Internet at all.
IPV6_PROBE = "2001:4860:4860::8888"


@dataclass(frozen=True)
class Observation:
    """One whoami answer: what the relay saw, from which local address, and how fast."""

    local: tuple[str, int]
    observed: tuple[str, int]
    connect_ms: float  # the TCP handshake: one round trip
    answer_ms: float  # whoami sent -> observed received: one more
    second_port: int | None  # the relay's second port, if it has one


@dataclass(frozen=True)
class Netcheck:
    relay: rv.RelayAddress
    local_port: int
    first: Observation
    second: Observation | None  # through the relay's second port
    second_error: str | None  # why there is no second observation
    ipv6: Observation | None  # the relay reached over IPv6
    ipv6_error: str | None  # why not


def describe(check: Netcheck) -> list[str]:
    """The report, one finding a line, the last one what it means."""
    first = check.first
    lines = [
        f"relay: {check.relay}: {first.connect_ms:.1f} ms to connect, "
        f"{first.answer_ms:.1f} ms to answer",
        f"public address: {endpoint(*first.observed)} (from local port {check.local_port})",
    ]
    no_nat = same_ip(first.observed[0], first.local[0])
    port_kept = first.observed[1] == check.local_port
    if no_nat:
        lines.append("NAT: none seen (the relay sees our own address)")
    elif port_kept:
        lines.append(f"port: the NAT keeps the port ({check.local_port})")
    else:
        lines.append(f"port: the NAT changes the port ({check.local_port} -> {first.observed[1]})")
    mapping: bool | None = None  # True: endpoint-independent
    if check.second is not None:
        a, b = first.observed, check.second.observed
        mapping = a == b
        if mapping:
            lines.append(
                f"mapping: the same public port for two destinations ({a[1]}): endpoint-independent"
            )
        else:
            lines.append(
                f"mapping: the NAT changes the port per destination ({endpoint(*a)} to port "
                f"{check.relay.port}, {endpoint(*b)} to port {first.second_port}): symmetric"
            )
    else:
        lines.append(f"mapping: could not be tested: {check.second_error}")
    if check.ipv6 is not None:
        lines.append(
            f"IPv6: yes, the relay sees {endpoint(*check.ipv6.observed)} "
            f"({check.ipv6.connect_ms:.1f} ms to connect)"
        )
    else:
        lines.append(f"IPv6: {check.ipv6_error}")
    lines.append(f"in short: {_verdict(no_nat, port_kept, mapping)}")
    return lines


def _verdict(no_nat: bool, port_kept: bool, mapping: bool | None) -> str:
    if no_nat:
        return "no NAT on our side: direct connections should work (the peer's NAT permitting)"
    if mapping is False:
        return (
            "expect to be relayed: our NAT gives every destination a new port, so the peer "
            "cannot know where to punch (a direct link may still open if the peer's side is "
            "open)"
        )
    if mapping is True:
        return "direct connections should work (the peer's NAT permitting)"
    if port_kept:
        return (
            "direct connections will likely work (the NAT keeps our port), but its mapping "
            "could not be tested"
        )
    return "unsure: the NAT changes our port and its mapping could not be tested; a relay helps"


async def probe(relay: rv.RelayAddress, local_port: int) -> Netcheck:
    """Ask the relay, on both of its ports and over IPv6; TeteError if it does not answer."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(relay.host, relay.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TeteError(f"the relay {relay}: cannot resolve {relay.host}: {why(exc)}") from exc
    families = {info[0] for info in infos}
    main = socket.AF_INET if socket.AF_INET in families else socket.AF_INET6
    held: list[Control] = []  # open until the end: the NAT's mappings stay as they were
    try:
        try:
            first = await _ask(relay, local_port, main, held)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TeteError(
                    f"cannot use local port {local_port}: {in_use_message(local_port)} "
                    "(netcheck asks from the port a tunnel punches from: pick another --lport)"
                ) from exc
            raise TeteError(f"the relay {relay} did not answer: {why(exc)}") from exc
        except (TimeoutError, rv.RendezvousError) as exc:
            raise TeteError(f"the relay {relay} did not answer: {why(exc)}") from exc
        second = None
        second_error = None
        if first.second_port is None:
            second_error = "the relay listens on one port only (it needs a second port)"
        else:
            other = rv.RelayAddress(relay.host, first.second_port)
            try:
                second = await _ask(other, local_port, main, held)
            except (OSError, TimeoutError, rv.RendezvousError) as exc:
                second_error = f"the relay's second port {first.second_port}: {why(exc)}"
        if main == socket.AF_INET6:
            ipv6, ipv6_error = first, None
        elif socket.AF_INET6 in families:
            try:
                ipv6, ipv6_error = await _ask(relay, local_port, socket.AF_INET6, held), None
            except (OSError, TimeoutError, rv.RendezvousError) as exc:
                ipv6, ipv6_error = None, f"the relay's IPv6 address did not answer: {why(exc)}"
        else:
            ipv6 = None
            ipv6_error = "not tested: the relay has no IPv6 address; " + (
                "this host has an IPv6 route" if _ipv6_route() else "no IPv6 route here"
            )
    finally:
        for control in held:
            control.close()
    return Netcheck(relay, local_port, first, second, second_error, ipv6, ipv6_error)


async def _ask(
    relay: rv.RelayAddress, local_port: int, family: socket.AddressFamily, held: list[Control]
) -> Observation:
    started = time.monotonic()
    sock = await connect_to(relay, local_port, family)
    connected = time.monotonic()
    control = Control(sock, relay)
    held.append(control)
    await control.send({"op": "whoami"})
    async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
        answer: dict[str, Any] = await control.expect("observed")
    answered = time.monotonic()
    ip, port = rv.parse_address(answer.get("addr"))
    second = answer.get("second_port")
    if not (isinstance(second, int) and 0 < second < 65536):
        second = None
    local = sock.getsockname()
    return Observation(
        local=(unmapped(local[0]), local[1]),
        observed=(unmapped(ip), port),
        connect_ms=(connected - started) * 1000,
        answer_ms=(answered - connected) * 1000,
        second_port=second,
    )


def _ipv6_route() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.connect((IPV6_PROBE, 53))
    except OSError:  # ENETUNREACH, mostly; or no IPv6 in this kernel at all
        return False
    return True
