"""`--via RELAY`: meet the peer at a relay, go direct when the NATs allow it, else through it.

The relay (tete_tunnel/relay.py) tells each side the other's public address as it sees it,
and its local addresses, then times the punch so that both sides' SYNs cross. For DIRECT_WAIT
seconds we try every address the peer may be reached at (happy eyeballs: its public address,
its --lport on that address for a NAT that keeps ports, its local addresses for two peers
behind one NAT); if no direct link authenticates, the relay joins two plain TCP connections
and the very same handshake (HELLO, SPAKE2 or pinned IDs, TLS 1.3) runs over them, end to end.

A `forward` that went through the relay keeps its control connection: every time the relay
times a new attempt, a direct link is tried; `upgrade()` returns it once one authenticates as
the same peer, and the supervisor moves the work over to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tete_tunnel import rendezvous as rv
from tete_tunnel.connector import DEFAULT_PORT, Punch, _Drops, announce
from tete_tunnel.errors import (
    AuthenticationError,
    HandshakeError,
    PunchError,
    TeteError,
    UsageError,
)
from tete_tunnel.identity import Identity
from tete_tunnel.net import same_ip, unmapped
from tete_tunnel.punch import tune_link_socket
from tete_tunnel.secure import (
    PREAUTH_TIMEOUT,
    WRONG_CODE,
    Auth,
    CodeGuessFailed,
    Progress,
    SecureLink,
    secure,
)
from tete_tunnel.session import Keepalive, linger_zero
from tete_tunnel.words import generate_code

log = logging.getLogger("tete_tunnel")

DIRECT_WAIT = 5.0  # seconds of direct attempts after the relay's punch, before relaying
RELAY_CONNECT_TIMEOUT = 5.0
GO_WAIT = 20.0  # after splice: for the relay's go (the peer's data connection is coming)
NAMEPLATE_PROPOSALS = 12  # two digits first, then three
RETRY_PAUSE = 2.0  # after a rendezvous that came to nothing (an impostor, a relay gone)


@dataclass(frozen=True)
class ViaConfig:
    relays: tuple[rv.RelayAddress, ...]
    local_port: int
    auth: Auth
    identity_dir: Path | None
    timeout: float
    keepalive: Keepalive | None
    peer_command: str = "tete-tunnel pipe"  # for the line that tells the peer what to type

    def check(self) -> None:
        """Refuse impossible combinations before touching the network."""
        if not 1 <= self.local_port <= 65535:
            raise UsageError(f"--lport {self.local_port} is not a TCP port (1-65535)")
        if self.timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        if self.auth.code is not None:
            rv.nameplate_of(self.auth.code)  # a code for a relay starts with its nameplate


class Control:
    """The control connection to a relay: messages both ways; pings answered as they come."""

    def __init__(self, sock: socket.socket, relay: rv.RelayAddress) -> None:
        self.sock = sock
        self.relay = relay
        self._decoder = rv.Decoder()
        self._messages: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await rv.send_message(self.sock, message)

    async def recv(self) -> dict[str, Any]:
        """The next message; RendezvousError for the relay's error, ConnectionError if gone."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._messages:
                data = await loop.sock_recv(self.sock, 4096)
                if not data:
                    raise ConnectionError(f"the relay {self.relay} closed the connection")
                self._messages.extend(self._decoder.feed(data))
            message = self._messages.pop(0)
            if message["op"] == "ping":
                await self.send({"op": "pong"})
                continue
            if message["op"] == "error":
                raise rv.RendezvousError(f"the relay {self.relay}: {message.get('reason')}")
            if message["op"] == "retry":  # the pair is over (the peer left): meet again
                raise _Retry(f"the relay {self.relay}: {message.get('reason')}")
            return message

    async def expect(self, op: str) -> dict[str, Any]:
        message = await self.recv()
        if message["op"] != op:
            raise rv.RendezvousError(f"the relay {self.relay} sent {message['op']}, not {op}")
        return message

    def close(self) -> None:
        """With RST: a TIME_WAIT on (our punch port, the relay) would keep the next control
        connection from that port to the same relay from being made (EADDRNOTAVAIL)."""
        linger_zero(self.sock)
        self.sock.close()


async def connect_to(
    relay: rv.RelayAddress, local_port: int | None, family: int = 0
) -> socket.socket:
    """A TCP connection to the relay, from our punch port when given (so the relay sees the
    public address our NAT gives that port); over `family` only when given."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(relay.host, relay.port, family=family, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local_port is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local_port))
        async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
            await loop.sock_connect(sock, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_control(relay: rv.RelayAddress, local_port: int) -> Control:
    return Control(await connect_to(relay, local_port), relay)


async def whoami(relays: tuple[rv.RelayAddress, ...], local_port: int) -> str:
    """Our public `ip:port` as the first reachable relay sees a connection from local_port."""
    errors = []
    for relay in relays:
        try:
            control = await open_control(relay, local_port)
        except (OSError, TimeoutError) as exc:
            errors.append(f"{relay}: {why(exc)}")
            continue
        try:
            await control.send({"op": "whoami"})
            async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
                observed = await control.expect("observed")
            ip, port = rv.parse_address(observed.get("addr"))
            return rv.format_address(ip, port)
        except (OSError, TimeoutError, rv.RendezvousError) as exc:
            errors.append(f"{relay}: {why(exc)}")
        finally:
            control.close()
    raise TeteError("no relay answered: " + "; ".join(errors))


def local_addresses(family: socket.AddressFamily, port: int) -> list[str]:
    """Our own addresses (not loopback), for a peer behind the same NAT."""
    import psutil  # only a relayed or rendezvous run lists interfaces

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != family or a.address.startswith(("127.", "::1", "fe80", "169.254")):
                continue
            out.append(rv.format_address(a.address.split("%")[0], port))
    return out[: rv.MAX_LOCAL_ADDRESSES]


@dataclass
class _Peer:
    """Where the peer may be reached, from the relay's introduction."""

    observed: tuple[str, int]
    local: list[tuple[str, int]]

    def candidates(self) -> list[tuple[str, int]]:
        ip = self.observed[0]
        out = [self.observed]
        for _, local_port in self.local:
            if (ip, local_port) not in out:
                out.append((ip, local_port))  # a NAT that keeps the port: the --lport
        for address in self.local:
            if not same_ip(address[0], ip) and address not in out:
                out.append(address)  # behind the same NAT as us: its LAN address
        return out


class _Retry(Exception):
    """This rendezvous came to nothing (an impostor, the relay gone): meet again."""


class RelayConnector:
    """Links through a relay's rendezvous; see the module docstring."""

    def __init__(self, config: ViaConfig, identity: Identity, *, keep_control: bool) -> None:
        self.config = config
        self.identity = identity
        self.keep_control = keep_control  # forward: stay on to upgrade to a direct link
        self.pinned: bytes | None = None
        self.codes_drawn = 0
        self.code = config.auth.code
        self.control: Control | None = None
        self.peer: _Peer | None = None
        self.path = "direct"

    def describe(self) -> str:
        return self.path

    def save_hint(self) -> str:
        """The options of `tete-tunnel peers add` that reach this peer again."""
        hint = "--via " + ",".join(str(relay) for relay in self.config.relays)
        port = self.config.local_port
        return hint + (f" --lport {port}" if port != DEFAULT_PORT else "")

    def waiting_for(self) -> str:
        """What a person waits for while we connect (the terminal's status line)."""
        relays = ", ".join(str(r) for r in self.config.relays)
        return f"the peer at the relay {relays}"

    async def aclose(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    # -- connect ------------------------------------------------------------------------------

    async def connect(self, deadline: float | None) -> SecureLink:
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._attempt(deadline)
            except _Retry as retry:
                log.warning("%s; meeting the peer at the relay again", retry)
                await self.aclose()
                pause = RETRY_PAUSE
                if deadline is not None:
                    if loop.time() + pause >= deadline:
                        raise PunchError(f"no link to the peer in time: {retry}") from None
                await asyncio.sleep(pause)

    def _auth(self) -> tuple[Auth, str | None]:
        """How to judge the peer this time, and the rendezvous name (None: allocate one)."""
        mine = self.identity.fingerprint
        if self.pinned is not None:
            return Auth(peer_fingerprint=self.pinned), rv.name_for_ids(mine, self.pinned)
        auth = self.config.auth
        if auth.peer_fingerprint is not None:
            return auth, rv.name_for_ids(mine, auth.peer_fingerprint)
        if self.code is not None:
            return Auth(code=self.code), rv.name_for_nameplate(rv.nameplate_of(self.code))
        return auth, None

    async def _attempt(self, deadline: float | None) -> SecureLink:
        await self.aclose()
        auth, name = self._auth()
        control = await self._meet(name, deadline)
        self.control = control
        try:
            if name is None:  # we made up a code: the peer types it
                auth = Auth(code=self.code)
            try:
                async with _until(deadline):
                    paired = await control.expect("paired")
            except TimeoutError:
                raise PunchError(
                    f"the peer did not come to the relay {control.relay} within "
                    f"--timeout {self.config.timeout:g} s"
                ) from None
            self.peer = _introduced(paired)
            log.info(
                "the peer is at %s (local: %s)",
                rv.format_address(*self.peer.observed),
                ", ".join(rv.format_address(*a) for a in self.peer.local) or "none",
            )
            link = await self._link(control, auth)
        except (ConnectionError, OSError) as exc:
            raise _Retry(f"the relay {control.relay} went away ({why(exc)})") from exc
        except BaseException:
            await self.aclose()
            raise
        announce(self, link)
        if link.path == "direct" or not self.keep_control:
            await self.aclose()
        return link

    async def _meet(self, name: str | None, deadline: float | None) -> Control:
        """Join the rendezvous at the first relay that answers (all peers order them alike).
        With no name yet (a code to generate), propose nameplates until one is free."""
        if name is not None:
            control = await self._meet_at(name, None, deadline)
            assert control is not None
            return control
        for attempt in range(NAMEPLATE_PROPOSALS):
            # two digits first; the relay says if one is taken, then we propose another
            nameplate = rv.random_nameplate(2 if attempt < NAMEPLATE_PROPOSALS // 2 else 3)
            control = await self._meet_at(rv.name_for_nameplate(nameplate), nameplate, deadline)
            if control is not None:
                return control
        raise PunchError("the relay had no free nameplate for a code; try again later")

    async def _meet_at(
        self, name: str, nameplate: str | None, deadline: float | None
    ) -> Control | None:
        """Join `name` (allocating `nameplate` first, when given); None if it is taken."""
        errors = []
        for relay in rv.pick_relays(list(self.config.relays), name):
            try:
                control = await open_control(relay, self.config.local_port)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{relay}: {why(exc)}")
                log.info("relay %s: %s", relay, why(exc))
                continue
            try:
                if nameplate is not None and not await self._allocate(control, nameplate):
                    control.close()
                    return None
                family = control.sock.family
                await control.send(
                    {
                        "op": "join",
                        "name": name,
                        "local": local_addresses(family, self.config.local_port),
                    }
                )
                async with _until(deadline, RELAY_CONNECT_TIMEOUT):
                    observed = await control.expect("observed")
            except rv.RendezvousError:
                control.close()
                raise
            except (OSError, TimeoutError) as exc:
                control.close()
                errors.append(f"{relay}: {why(exc)}")
                continue
            log.info("the relay %s sees us as %s", relay, observed.get("addr"))
            what = f"nameplate {name[3:]}" if name.startswith("np-") else "our pinned IDs"
            log.warning("waiting for the peer at the relay %s (%s)", relay, what)
            return control
        raise PunchError("no relay could be reached: " + "; ".join(errors))

    async def _allocate(self, control: Control, nameplate: str) -> bool:
        """Reserve the nameplate at the relay (it is the one both peers' hashing picks);
        False if it is taken."""
        await control.send({"op": "allocate", "nameplate": nameplate})
        async with asyncio.timeout(RELAY_CONNECT_TIMEOUT):
            try:
                answer = await control.expect("nameplate")
            except rv.RendezvousError as exc:
                if "nameplate taken" in str(exc):
                    return False
                raise
        if answer.get("nameplate") != nameplate:
            raise rv.RendezvousError(f"the relay {control.relay} gave another nameplate")
        self.code = generate_code(nameplate)
        log.warning("your code: %s", self.code)
        log.warning(
            "on the other side, type: %s --via %s --code %s",
            self.config.peer_command,
            ",".join(str(r) for r in self.config.relays),
            self.code,
        )
        return True

    async def _link(self, control: Control, auth: Auth) -> SecureLink:
        """Direct if the relay-timed punch works, else through the relay."""
        async with asyncio.timeout(30.0):
            await control.expect("punch")
        try:
            link = await self._direct(auth)
        except AuthenticationError:  # a code tried and missed: the relay closes the nameplate
            with contextlib.suppress(OSError):
                await control.send({"op": "result", "direct": False, "auth_failed": True})
            raise
        try:
            await control.send({"op": "result", "direct": link is not None})
            async with asyncio.timeout(30.0):
                verdict = await control.recv()
        except BaseException:
            if link is not None:
                _close(link)
            raise
        if verdict["op"] == "direct" and link is not None:
            self.path = "direct"
            return replace(link, path="direct")
        if link is not None:  # the relay decides: both must take the same path
            _close(link)
        if verdict["op"] != "splice" or not isinstance(verdict.get("token"), str):
            raise rv.RendezvousError(f"the relay {control.relay} sent {verdict['op']}")
        return await self._relayed(control, auth, verdict["token"])

    async def _direct(self, auth: Auth) -> SecureLink | None:
        """A direct link within DIRECT_WAIT (and the handshakes then under way), or None;
        AuthenticationError when a code was tried and missed (the run ends)."""
        assert self.peer is not None
        loop = asyncio.get_running_loop()
        drops = _Drops()
        punch = Punch(
            self.identity,
            auth,
            self.config.local_port,
            self.peer.candidates(),
            self.config.keepalive,
            drops,
        )
        try:
            return await punch.run(loop.time() + DIRECT_WAIT, finish_in_flight=PREAUTH_TIMEOUT)
        finally:
            drops.flush()
            self.codes_drawn += punch.codes_drawn

    async def _relayed(self, control: Control, auth: Auth, token: str) -> SecureLink:
        relay = control.relay
        sock = await connect_to(relay, None)
        try:
            await rv.send_message(sock, {"op": "splice", "token": token})
            async with asyncio.timeout(GO_WAIT):
                go = await rv.recv_message(sock, f"the relay {relay}")
            if go["op"] == "error":
                raise rv.RendezvousError(f"the relay {relay}: {go.get('reason')}")
            if go["op"] != "go":
                raise rv.RendezvousError(f"the relay {relay} sent {go['op']}, not go")
            if self.config.keepalive is not None:
                keepalive = self.config.keepalive
                tune_link_socket(sock, keepalive.interval, keepalive.timeout)
            progress = Progress()
            try:
                async with asyncio.timeout(PREAUTH_TIMEOUT):
                    link = await secure(sock, self.identity, auth, progress)
            except TimeoutError:
                if progress.code_spent:
                    raise CodeGuessFailed(
                        WRONG_CODE.format(what="the peer went silent after its code message")
                    ) from None
                raise _Retry("the relayed handshake did not complete in time") from None
        except AuthenticationError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                await control.send({"op": "result", "auth_failed": True})
            raise exc
        except HandshakeError as exc:
            sock.close()
            raise _Retry(f"the peer met at the relay was dropped: {exc}") from exc
        except (OSError, TimeoutError, rv.RendezvousError) as exc:
            sock.close()
            raise _Retry(f"relaying through {relay} failed ({why(exc)})") from exc
        self.path = f"relayed via {relay}"
        return replace(link, path=self.path)

    # -- upgrade ------------------------------------------------------------------------------

    async def upgrade(self) -> SecureLink:
        """While relayed: a direct link to the same peer, once a relay-timed attempt makes
        one. Waits (forever, if need be) for the relay's punch signals."""
        control, peer = self.control, self.peer
        if control is None or peer is None or self.pinned is None:
            await asyncio.Future()  # nothing to upgrade with: wait to be cancelled
        assert control is not None
        auth = Auth(peer_fingerprint=self.pinned)
        while True:
            try:
                message = await control.recv()
            except (ConnectionError, OSError, rv.RendezvousError, _Retry):
                await asyncio.Future()  # the relay is gone: stay relayed
            if message["op"] != "punch":
                continue
            link = await self._direct(auth)
            if link is not None:
                self.path = "direct"
                await self.aclose()
                return replace(link, path="direct")


def _introduced(message: dict[str, Any]) -> _Peer:
    peer = message.get("peer")
    if not isinstance(peer, dict):
        raise rv.RendezvousError("the relay's introduction has no peer")
    observed = rv.parse_address(peer.get("observed"))
    local = []
    for text in peer.get("local", [])[: rv.MAX_LOCAL_ADDRESSES]:
        with contextlib.suppress(rv.RendezvousError):
            local.append(rv.parse_address(text))
    return _Peer((unmapped(observed[0]), observed[1]), local)


def _close(link: SecureLink) -> None:
    if link.carrier.transport is not None:
        link.carrier.transport.abort()


def why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, OSError) and exc.errno is not None:
        # asyncio's sock_connect puts "Connect call failed (addr)" where strerror goes
        return os.strerror(exc.errno) or errno.errorcode.get(exc.errno, str(exc))
    return str(exc) or type(exc).__name__


def _until(deadline: float | None, cap: float | None = None) -> asyncio.Timeout:
    """asyncio.timeout to a loop-clock deadline (None: none), at most `cap` seconds away."""
    when = deadline
    if cap is not None:
        capped = asyncio.get_running_loop().time() + cap
        when = capped if when is None else min(when, capped)
    return asyncio.timeout_at(when)
