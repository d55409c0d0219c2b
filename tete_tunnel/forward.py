"""`forward`: ssh-style -L and -R port forwards over the session's streams.

-L listens here and, for each connection, opens a stream asking the peer to CONNECT to its
target. -R asks the peer, on a control stream that lives as long as the listener, to LISTEN;
each connection there comes back to us as a FORWARDED stream and we connect to our target.
The peer's requests are checked against our access policy on every open.

Local listeners are bound before the link is made, so a taken port fails at once, and they
belong to the Forwarder, not to one session (a later reconnect can keep them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

from tete_tunnel import log as logmod
from tete_tunnel import preamble
from tete_tunnel.errors import LinkLost, TeteError, UsageError
from tete_tunnel.link import LinkConfig, establish
from tete_tunnel.policy import Policy
from tete_tunnel.punch import endpoint, port_holder
from tete_tunnel.session import PeerLeft, Session, Stream
from tete_tunnel.shutdown import Interrupted, Signals
from tete_tunnel.splice import ConnectFailed, OpenFailed, Refused, Splice, connect_and_splice

log = logging.getLogger("tete_tunnel")

SPEC_SYNTAX = "[bind_address:]port:host:hostport (IPv6 addresses in brackets)"
PREAMBLE_TIMEOUT = 10.0  # a peer's open request must arrive within this
CONNECT_TIMEOUT = 10.0  # connecting to a target
LISTEN_BACKLOG = 512  # bursts of connections wait in the kernel, not in memory


@dataclass(frozen=True)
class ForwardSpec:
    bind_host: str
    bind_port: int
    host: str
    port: int
    text: str


def _split_fields(text: str) -> list[str]:
    """Split on colons outside brackets; brackets are removed from the fields."""
    fields, current, depth = [], "", 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == ":" and depth == 0:
            fields.append(current)
            current = ""
            continue
        current += ch
    if depth != 0:
        raise ValueError("unbalanced brackets")
    fields.append(current)
    return [f[1:-1] if f.startswith("[") and f.endswith("]") else f for f in fields]


def _port(text: str, allow_zero: bool) -> int:
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


def parse_spec(text: str, option: str) -> ForwardSpec:
    """Parse OpenSSH's `[bind_address:]port:host:hostport`; bind defaults to 127.0.0.1."""
    try:
        fields = _split_fields(text)
        if len(fields) == 3:
            fields.insert(0, "127.0.0.1")
        if len(fields) != 4 or not fields[2]:
            raise ValueError("wrong number of fields")
        bind = fields[0]
        if bind in ("", "*"):
            bind = "0.0.0.0"
        return ForwardSpec(
            bind_host=bind,
            bind_port=_port(fields[1], allow_zero=True),
            host=fields[2],
            port=_port(fields[3], allow_zero=False),
            text=text,
        )
    except ValueError as exc:
        raise UsageError(f"bad {option} {text!r} ({exc}): expected {SPEC_SYNTAX}") from None


async def bind_listener(host: str, port: int) -> socket.socket:
    """A listening non-blocking socket; a taken port names its holder if it can."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TeteError(f"cannot listen on {endpoint(host, port)}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = endpoint(host, port)
        if exc.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            by = f" by {holder}" if holder else ""
            raise TeteError(f"cannot listen on {where}: the port is already in use{by}") from exc
        raise TeteError(f"cannot listen on {where}: {exc.strerror}") from exc
    return sock


async def resolve(host: str, port: int) -> list[tuple]:
    """Addresses for host:port; an IP literal needs no resolver (asyncio would use a thread)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if ip.version == 6:
            return [(socket.AF_INET6, (host, port, 0, 0))]
        return [(socket.AF_INET, (host, port))]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TeteError(f"cannot resolve {host}: {exc.strerror}") from exc
    return [(family, address) for family, _, _, _, address in infos]


class Forwarder:
    def __init__(
        self,
        local: list[ForwardSpec],
        remote: list[ForwardSpec],
        policy: Policy,
        keep_going: bool = False,
    ) -> None:
        self.local = local
        self.remote = remote
        self.policy = policy
        self.keep_going = keep_going
        self.listeners: list[tuple[ForwardSpec, socket.socket]] = []
        self._remote_by_stream: dict[int, ForwardSpec] = {}

    async def bind_local(self) -> None:
        for spec in self.local:
            try:
                sock = await bind_listener(spec.bind_host, spec.bind_port)
            except TeteError as exc:
                if not self.keep_going:
                    self.close()
                    raise
                log.warning("error: -L %s: %s (going on without it)", spec.text, exc)
                continue
            self.listeners.append((spec, sock))

    def close(self) -> None:
        for _, sock in self.listeners:
            sock.close()
        self.listeners.clear()

    async def serve(self, session: Session) -> None:
        """Run the forwards over one session until it ends (raises why, PeerLeft if orderly)."""
        self._remote_by_stream.clear()
        async with asyncio.TaskGroup() as tg:
            for spec, sock in self.listeners:
                bound = endpoint(*sock.getsockname()[:2])
                print(f"Forwarding {bound} -> peer {endpoint(spec.host, spec.port)}", flush=True)
                request = preamble.Connect(spec.host, spec.port)
                # The relay closes the socket it serves: ours stays for the next session.
                tg.create_task(self._relay(session, sock.dup(), request, spec.text))
            for spec in self.remote:
                tg.create_task(self._request_remote(session, spec))
            while True:
                stream = await session.accept()
                tg.create_task(self._incoming(session, stream))

    # -- -L: our listeners --------------------------------------------------------------

    async def _relay(
        self,
        session: Session,
        sock: socket.socket,
        request: preamble.Request,
        label: str,
        until: asyncio.Event | None = None,
    ) -> None:
        """Each connection to `sock` goes to the peer on a stream that starts with `request`.

        Runs until cancelled, or until `until` is set and the connections it accepted have
        ended. Connections are protocols owned here (no task each): cheap to accept, and
        reset when this returns. Takes `sock` over: it is closed when `until` is set or when
        this returns.
        """
        loop = asyncio.get_running_loop()
        opening = preamble.encode(request)
        conns: set[Splice] = set()
        idle = asyncio.Event()
        idle.set()

        def open_stream() -> Stream:
            stream = session.open_stream()
            stream.write(opening)  # data may follow at once: no round trip
            return stream

        def ended(conn: Splice, error: BaseException | None) -> None:
            conns.discard(conn)
            if not conns:
                idle.set()
            if error is None or isinstance(error, (PeerLeft, LinkLost)):
                return  # the session's end is reported once, by the caller of serve()
            if isinstance(error, Refused):
                log.warning(
                    "%s: the peer refused the connection from %s: %s", label, conn.client, error
                )
            elif isinstance(error, OpenFailed):
                log.warning("%s: %s; dropping the connection", label, error)
            else:
                log.info("%s: connection from %s ended: %s", label, conn.client, error)

        def accepted() -> Splice:
            conn = Splice(open_stream, answer_pending=True, on_end=ended)
            conns.add(conn)
            idle.clear()
            return conn

        try:
            server = await loop.create_server(accepted, sock=sock, backlog=LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        try:
            if until is None:
                await asyncio.Future()  # until cancelled
            else:
                await until.wait()
                server.close()
                await idle.wait()
        finally:
            server.close()
            for conn in list(conns):
                conn.abort()

    # -- -R: we ask the peer to listen ------------------------------------------------------

    async def _request_remote(self, session: Session, spec: ForwardSpec) -> None:
        control = session.open_stream()
        self._remote_by_stream[control.id] = spec  # before any FORWARDED can name it
        control.write(preamble.encode(preamble.Listen(spec.bind_host, spec.bind_port)))
        try:
            async with asyncio.timeout(PREAMBLE_TIMEOUT):
                answer = await preamble.read_message(control)
        except TimeoutError:
            answer = preamble.Refuse("no answer from the peer")
        except preamble.PreambleError as exc:
            answer = preamble.Refuse(str(exc))
        if isinstance(answer, preamble.Bound):
            where = endpoint(spec.bind_host, answer.port)
            print(f"Forwarding peer {where} -> {endpoint(spec.host, spec.port)}", flush=True)
            return  # the control stream stays open: the peer keeps listening while it is
        reason = answer.reason if isinstance(answer, preamble.Refuse) else repr(answer)
        del self._remote_by_stream[control.id]
        control.reset()
        if not self.keep_going:
            raise TeteError(f"the peer refused -R {spec.text}: {reason}")
        log.warning("error: the peer refused -R %s: %s (going on without it)", spec.text, reason)

    # -- the peer's requests --------------------------------------------------------------

    async def _incoming(self, session: Session, stream: Stream) -> None:
        try:
            async with asyncio.timeout(PREAMBLE_TIMEOUT):
                request = await preamble.read_message(stream)
        except (TimeoutError, preamble.PreambleError) as exc:
            log.warning("reset a stream from the peer: %s", exc or "no open request in time")
            stream.reset()
            return
        except (PeerLeft, TeteError):
            return
        try:
            match request:
                case preamble.Connect(host, port):
                    await self._serve_connect(stream, host, port)
                case preamble.Listen(host, port):
                    await self._serve_listen(session, stream, host, port)
                case preamble.Forwarded(listener_id):
                    await self._serve_forwarded(stream, listener_id)
                case _:
                    preamble.refuse(stream, "this peer runs `tete-tunnel forward`, not `pipe`")
        except (PeerLeft, LinkLost):
            pass  # the session's end is reported once, by the caller of serve()
        except TeteError as exc:  # e.g. the peer reset the stream while we connected
            log.info("a stream from the peer ended: %s", exc)

    async def _serve_connect(self, stream: Stream, host: str, port: int) -> None:
        try:
            addresses = await resolve(host, port)
        except TeteError as exc:
            preamble.refuse(stream, str(exc))
            return
        refusal = self.policy.open_refusal(host, port, [a[1][0] for a in addresses])
        if refusal is not None:
            log.warning("refused the peer's request to connect to %s", endpoint(host, port))
            preamble.refuse(stream, refusal)
            return
        await self._connect_and_splice(stream, host, port, addresses, "the peer's -L")

    async def _serve_forwarded(self, stream: Stream, listener_id: int) -> None:
        spec = self._remote_by_stream.get(listener_id)
        if spec is None:
            preamble.refuse(stream, f"no -R forward with id {listener_id} here")
            return
        try:
            addresses = await resolve(spec.host, spec.port)
        except TeteError as exc:
            log.warning("-R %s: %s", spec.text, exc)
            preamble.refuse(stream, str(exc))
            return
        await self._connect_and_splice(stream, spec.host, spec.port, addresses, f"-R {spec.text}")

    async def _connect_and_splice(
        self, stream: Stream, host: str, port: int, addresses: list[tuple], label: str
    ) -> None:
        accept = preamble.encode(preamble.Accept())
        try:
            await connect_and_splice(
                stream, host, port, addresses, answer=accept, per_address=CONNECT_TIMEOUT
            )
        except ConnectFailed as exc:
            log.warning("%s: %s", label, exc)
            preamble.refuse(stream, str(exc))
        except (PeerLeft, LinkLost):
            pass
        except TeteError as exc:
            log.info("%s: connection to %s ended: %s", label, endpoint(host, port), exc)

    async def _serve_listen(self, session: Session, stream: Stream, host: str, port: int) -> None:
        """Listen for the peer while its control stream is open; each connection goes back."""
        refusal = self.policy.listen_refusal(host, port)
        if refusal is not None:
            log.warning("refused the peer's request to listen on %s", endpoint(host, port))
            preamble.refuse(stream, refusal)
            return
        try:
            sock = await bind_listener(host, port)
        except TeteError as exc:
            log.warning("the peer's -R: %s", exc)
            preamble.refuse(stream, str(exc))
            return
        bound = sock.getsockname()[1]
        log.info("listening on %s for the peer", endpoint(host, bound))
        stream.write(preamble.encode(preamble.Bound(bound)))
        label = f"the peer's -R on {endpoint(host, bound)}"
        closed = asyncio.Event()  # the peer closed the forward; its connections may finish
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_wait_stream_end(stream, closed))
                await self._relay(session, sock, preamble.Forwarded(stream.id), label, closed)
        finally:
            sock.close()
            log.info("stopped listening on %s", endpoint(host, bound))


async def _wait_stream_end(stream: Stream, closed: asyncio.Event) -> None:
    with contextlib.suppress(TeteError, PeerLeft):
        while await stream.read():
            pass
    closed.set()


async def forward_command(config: LinkConfig, forwarder: Forwarder) -> None:
    """The whole `tete-tunnel forward`: bind, link up, serve until a signal or the peer ends."""
    with Signals() as signals:
        await forwarder.bind_local()
        try:
            try:
                link = await signals.interruptible(establish(config))
            except Interrupted:
                raise TeteError("interrupted before the peer was connected") from None
            async with Session(
                link.carrier, client=link.is_tls_client, keepalive=config.keepalive
            ) as session:
                try:
                    await signals.interruptible(forwarder.serve(session))
                except Interrupted:
                    await session.close()
                    logmod.event("Closed connection")
                    return
                except BaseExceptionGroup as group:
                    error = _most_telling(group)
                    if isinstance(error, PeerLeft):
                        logmod.event("Peer closed connection")
                        return
                    raise error from None
                except PeerLeft:
                    logmod.event("Peer closed connection")
                    return
        finally:
            forwarder.close()


def _most_telling(group: BaseExceptionGroup) -> BaseException:
    for cls in (TeteError, PeerLeft):
        for e in group.exceptions:
            if isinstance(e, cls):
                return e
    return group
