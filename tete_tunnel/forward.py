"""`forward`: ssh-style -L and -R port forwards over the session's streams.

-L listens here and, for each connection, opens a stream asking the peer to CONNECT to its
target. -R asks the peer, on a control stream that lives as long as the listener, to LISTEN;
each connection there comes back to us as a FORWARDED stream and we connect to our target.
The peer's requests are checked against our access policy on every open. -D is -L whose
target each client names in SOCKS (`socks.py`): the peer resolves it and checks it against
its policy like any CONNECT, and its refusal comes back as the SOCKS reply code.

Our -L listeners live above any one session: they are bound before the first link (a taken
port fails at once) and stay open while the link is down and being made again. A connection
that arrives meanwhile waits for the link (at most CONNECTION_WAIT) with its reading paused;
connections that were open on a lost link are reset, never ended as if complete. The -R
forwards are requested again on every new session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tete_tunnel import preamble, socks
from tete_tunnel.errors import Closed, LinkBroken, TeteError, UsageError
from tete_tunnel.log import Throttled
from tete_tunnel.net import Address, endpoint, is_ip_literal, listen_on, resolve
from tete_tunnel.policy import Policy
from tete_tunnel.secure import SecureLink
from tete_tunnel.session import Session, Stream
from tete_tunnel.splice import (
    TCP_HIGH_WATER,
    ConnectFailed,
    OpenFailed,
    Refused,
    Splice,
    connect_splice,
    session_ended,
)
from tete_tunnel.supervisor import Ending

log = logging.getLogger("tete_tunnel")

SPEC_SYNTAX = "[bind_address:]port:host:hostport (IPv6 addresses in brackets)"
DYNAMIC_SYNTAX = "[bind_address:]port (IPv6 addresses in brackets)"
SOCKS_TIMEOUT = 10.0  # a SOCKS client's greeting and request must arrive within this
PREAMBLE_TIMEOUT = 10.0  # a peer's open request must arrive within this
CONNECT_TIMEOUT = 10.0  # connecting to a target
LISTEN_BACKLOG = 512  # bursts of connections wait in the kernel, not in memory
CONNECTION_WAIT = 30.0  # a connection that arrives while the link is down waits this long
# A -R asked again on a new session may find the port still held by the listener of the
# session it replaces, for as long as that one's end takes to reach the peer.
REQUEST_RETRIES = 10
REQUEST_RETRY_PAUSE = 0.3
DEFAULT_MAX_CONNECTIONS = 512  # client connections at once per listener (--max-connections)
JUDGED_LIMIT = 1024  # IP targets whose policy verdict is remembered (then forgotten at once)
ACCEPT = preamble.encode(preamble.Accept())


@dataclass(frozen=True)
class ForwardSpec:
    bind_host: str
    bind_port: int
    host: str
    port: int
    text: str


@dataclass(frozen=True)
class DynamicSpec:
    """-D: a SOCKS listener; each client names its own target at the peer."""

    bind_host: str
    bind_port: int
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
    if not text.strip().isdigit() or not text.strip().isascii():
        raise ValueError(f"port must be a number, not {text!r}")
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


def parse_dynamic(text: str, option: str = "-D") -> DynamicSpec:
    """Parse OpenSSH's -D `[bind_address:]port`; bind defaults to 127.0.0.1."""
    try:
        fields = _split_fields(text)
        if len(fields) == 1:
            fields.insert(0, "127.0.0.1")
        if len(fields) != 2:
            raise ValueError("wrong number of fields")
        bind = "0.0.0.0" if fields[0] in ("", "*") else fields[0]
        return DynamicSpec(bind, _port(fields[1], allow_zero=True), text)
    except ValueError as exc:
        raise UsageError(f"bad {option} {text!r} ({exc}): expected {DYNAMIC_SYNTAX}") from None


async def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on the first address `host` resolves to."""
    addresses = await resolve(host, port, passive=True)
    return listen_on(addresses[0], LISTEN_BACKLOG)


class _Reject(asyncio.Protocol):
    """A connection over the limit: reset at once, before any byte is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        transport.abort()


class SocksSplice(Splice):
    """A Splice whose client first names its target in SOCKS.

    Reading stays on until the request is complete (at most `timeout` seconds), then
    `on_made` opens a stream to that target. The peer's answer becomes the SOCKS reply: the
    success reply before the peer's data, or the code for its refusal, after which the
    client is closed (not reset, so it reads the reply) and the stream reset.
    """

    def __init__(
        self,
        *,
        on_made: Callable[[Splice], None],
        on_end: Callable[[Splice, BaseException | None], None],
        timeout: float = SOCKS_TIMEOUT,
    ) -> None:
        super().__init__(on_made=on_made, on_end=on_end, answer_pending=True)
        self.handshake = socks.Handshake()
        self.request: preamble.Connect | None = None
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._replying = False  # the request is in and not answered: failures are told

    @property
    def client(self) -> str:
        who = super().client
        if self.request is None:
            return who
        return f"{who} (to {endpoint(self.request.host, self.request.port)})"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        self.fail(socks.SocksError(f"no SOCKS request within {self._timeout:g} s"))

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            super().data_received(data)
            return
        if self.ended or self.transport is None:
            return
        try:
            self.handshake.receive_data(data)
        except socks.SocksError as exc:
            self._close_with(exc.reply, exc)
            return
        if out := self.handshake.data_to_send():
            self.transport.write(out)
        target = self.handshake.target
        if target is None:
            return
        self._cancel_timer()
        self.request = preamble.Connect(target.host, target.port)
        self._replying = True
        self.transport.pause_reading()  # until start() gives us a stream
        self.reading_paused = True
        if self.handshake.rest:
            self._early.append(self.handshake.rest)
        try:
            self._on_made(self)
        except Exception as exc:
            self.fail(OpenFailed(str(exc) or "no stream for the connection"))

    def eof_received(self) -> bool:
        if self.request is None:
            self.fail(socks.SocksError("the client closed before its SOCKS request"))
            return False
        return super().eof_received()

    def accepted(self) -> None:
        self._replying = False
        assert self.transport is not None
        self.transport.write(self.handshake.success())

    def fail(self, error: BaseException) -> None:
        if self._replying and not self.ended:
            if isinstance(error, Refused):
                code = socks.reply_for_refusal(str(error))
            else:
                code = socks.Reply.GENERAL_FAILURE
            self._close_with(self.handshake.failure(code), error)
        else:
            super().fail(error)

    def _close_with(self, reply: bytes, error: BaseException) -> None:
        """Send the client `reply` (if any) and close it; reset the stream; report once."""
        self._replying = False
        self._cancel_timer()
        transport = self.transport
        if self.ended or not reply or transport is None or transport.is_closing():
            super().fail(error)
            return
        self.ended = True
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.on_drained = None
            stream.reset()
        transport.write(reply)
        transport.close()
        self.on_end(self, error)

    def abort(self) -> None:
        self._cancel_timer()
        super().abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Relay:
    """A listening socket whose connections go to the peer on streams opened with `request`
    (None: a SOCKS listener, each client's request says what to open).

    The relay outlives sessions: `attach` gives it the session to open streams on, `detach`
    takes it away; connections made in between wait (paused) until the next attach or until
    `wait` seconds have passed. Connections are protocols owned here (no task each): cheap
    to accept, and reset when the relay closes.
    """

    def __init__(
        self,
        sock: socket.socket,
        request: preamble.Request | None,
        label: str,
        *,
        max_connections: int,
        wait: float = CONNECTION_WAIT,
    ) -> None:
        self.sock = sock
        self.label = label
        self._opening = preamble.encode(request) if request is not None else None
        self._max = max_connections
        self._wait = wait
        self._session: Session | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[Splice] = set()
        self._waiting: dict[Splice, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._throttled = Throttled()

    @property
    def bound(self) -> str:
        return endpoint(*self.sock.getsockname()[:2])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accepted, sock=self.sock, backlog=LISTEN_BACKLOG
        )

    def attach(self, session: Session) -> None:
        self._session = session
        waiting, self._waiting = self._waiting, {}
        for conn, timer in waiting.items():
            timer.cancel()
            self._open(conn, session)

    def detach(self, session: Session) -> None:
        """No more new connections on `session` (unless another has taken its place)."""
        if self._session is session:
            self._session = None

    async def stop_accepting_and_drain(self) -> None:
        """No new connections; until the ones already here have ended."""
        if self._server is not None:
            self._server.close()
        await self._idle.wait()

    def close(self) -> None:
        """Stop listening and reset every connection still here."""
        if self._server is not None:
            self._server.close()
        else:
            self.sock.close()
        for timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        self._idle.set()

    # -- connections ------------------------------------------------------------------

    def _drop(self, why: str) -> None:
        """A connection we could not take: a burst of them is one line per cause."""
        now = asyncio.get_running_loop().time()
        self._throttled.warning(why, now, "%s: dropped a connection: %s", self.label, why)

    def _accepted(self) -> asyncio.Protocol:
        if len(self._conns) >= self._max:
            self._drop(f"{self._max} connections at once already (--max-connections)")
            return _Reject()
        conn: Splice
        if self._opening is None:
            conn = SocksSplice(on_made=self._made, on_end=self._ended)
        else:
            conn = Splice(on_made=self._made, on_end=self._ended, answer_pending=True)
        self._conns.add(conn)
        self._idle.clear()
        return conn

    def _made(self, conn: Splice) -> None:
        session = self._session
        if session is not None and not session.ended.is_set():
            self._open(conn, session)
            return
        loop = asyncio.get_running_loop()
        log.info("%s: %s waits for the link to the peer", self.label, conn.client)
        self._waiting[conn] = loop.call_later(self._wait, self._gave_up, conn)

    def _gave_up(self, conn: Splice) -> None:
        self._waiting.pop(conn, None)
        conn.fail(OpenFailed(f"no link to the peer for {self._wait:g} s"))

    def _open(self, conn: Splice, session: Session) -> None:
        try:
            if self._opening is not None:
                opening = self._opening
            else:
                assert isinstance(conn, SocksSplice) and conn.request is not None
                opening = preamble.encode(conn.request)
            stream = session.open_stream()
            stream.write(opening)  # data may follow at once: no round trip
        except TeteError as exc:
            conn.fail(OpenFailed(str(exc) or "the session has ended"))
            return
        conn.start(stream)

    def _ended(self, conn: Splice, error: BaseException | None) -> None:
        self._conns.discard(conn)
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
        if not self._conns:
            self._idle.set()
        if error is None or session_ended(error):
            return  # the session's end is reported once, by the supervisor
        if isinstance(error, Refused):
            self._throttled.warning(
                "refused",
                asyncio.get_running_loop().time(),
                "%s: the peer refused the connection from %s: %s",
                self.label,
                conn.client,
                error,
            )
        elif isinstance(error, socks.SocksError):
            self._throttled.warning(
                "socks",
                asyncio.get_running_loop().time(),
                "%s: closed the SOCKS client %s: %s",
                self.label,
                conn.client,
                error,
            )
        elif isinstance(error, OpenFailed):
            self._drop(str(error))
        else:
            log.info("%s: connection from %s ended: %s", self.label, conn.client, error)


class _Serving:
    """What serving the peer's streams on one session owns: the tasks that resolve and
    connect (cancelled when the session's run ends), and the connections spliced to its
    streams (reset then)."""

    __slots__ = ("closed", "session", "splices", "tasks")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.splices: set[Splice] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class _Opening:
    """A stream the peer opened, until its open request is in. The request is parsed from
    the stream's data inside the dispatch (the opening frame usually carries it whole, so
    no task waits for it); one that is not complete within PREAMBLE_TIMEOUT, or malformed,
    resets the stream. The data behind the request stays in the stream for the splice."""

    __slots__ = ("_forwarder", "_head", "_serving", "_stream", "_timer")

    def __init__(self, forwarder: Forwarder, serving: _Serving, stream: Stream) -> None:
        self._forwarder = forwarder
        self._serving = serving
        self._stream = stream
        self._head = b""
        self._timer: asyncio.TimerHandle | None = None

    def stream_data(self, data: bytes) -> None:
        head = self._head + data if self._head else data
        try:
            found = preamble.parse(head)
        except preamble.PreambleError as exc:
            self._bad(str(exc))
            return
        if found is None:
            self._head = head
            if self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(PREAMBLE_TIMEOUT, self._bad, "no open request")
            return
        self._stop_timer()
        request, used = found
        stream = self._stream
        stream.credit(used)  # the rest is credited as the splice passes it on
        stream.detach(head[used:])
        self._forwarder._request(self._serving, stream, request)

    def stream_eof(self) -> None:
        self._bad("the stream ended inside its open message")

    def stream_error(self, error: BaseException) -> None:
        self._stop_timer()
        if not session_ended(error):
            log.info("a stream from the peer ended: %s", error)

    def _bad(self, why: str) -> None:
        self._stop_timer()
        self._stream.detach()
        self._forwarder._warn("bad-request", "reset a stream from the peer: %s", why)
        self._stream.reset()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass
class _Remote:
    """One -R forward: its spec and the port the peer bound the first time."""

    spec: ForwardSpec
    port: int | None = None  # after the first BOUND: ask for the same port again
    given_up: bool = False


@dataclass
class Forwarder:
    """The application of `tete-tunnel forward`, for the supervisor."""

    local: list[ForwardSpec]
    remote: list[ForwardSpec]
    policy: Policy
    dynamic: list[DynamicSpec] = field(default_factory=list)  # our -D SOCKS listeners
    keep_going: bool = False
    reconnect: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    relays: list[Relay] = field(default_factory=list)  # our -L and -D listeners
    _bound_specs: list[ForwardSpec | DynamicSpec] = field(default_factory=list)  # in order
    _remotes: list[_Remote] = field(default_factory=list)
    # Our -R forwards by (session, control stream id): the id a FORWARDED names.
    _remote_by_stream: dict[tuple[int, int], ForwardSpec] = field(default_factory=dict)
    _controls: dict[int, list[Stream]] = field(default_factory=dict)  # by session
    _interrupted: asyncio.Event | None = None
    _sessions: int = 0
    _throttled: Throttled = field(default_factory=Throttled)
    # CONNECT targets given as IP addresses, judged by the policy once: (addresses, refusal).
    _judged: dict[tuple[str, int], tuple[list[Address], str | None]] = field(default_factory=dict)
    # Called once, when the first link is up and every forward is set up (-L listeners
    # bound and announced, every -R answered): `forward -f` goes to the background then.
    on_ready: Callable[[], None] | None = None
    _unanswered: int = 0  # -R requests of the first session not answered yet
    # For the summary at exit: what went through every session, and the last path.
    sent: int = 0
    received: int = 0
    streams: int = 0
    path: str = ""
    started_at: float | None = None  # loop time the first link came up

    async def prepare(self) -> None:
        """Bind the -L and -D listeners before any link, so a taken port fails at once."""
        self._interrupted = asyncio.Event()
        self._remotes = [_Remote(spec) for spec in self.remote]
        try:
            for spec in [*self.local, *self.dynamic]:
                option = "-L" if isinstance(spec, ForwardSpec) else "-D"
                try:
                    sock = await bind_listener(spec.bind_host, spec.bind_port)
                except TeteError as exc:
                    if not self.keep_going:
                        raise
                    log.warning("warning: %s %s: %s (going on without it)", option, spec.text, exc)
                    continue
                if isinstance(spec, ForwardSpec):
                    request: preamble.Request | None = preamble.Connect(spec.host, spec.port)
                    label = spec.text
                else:
                    request, label = None, f"-D {spec.text}"
                relay = Relay(sock, request, label, max_connections=self.max_connections)
                self.relays.append(relay)
                self._bound_specs.append(spec)
                await relay.start()
        except BaseException:
            await self.close()
            raise

    def interrupt(self) -> None:
        assert self._interrupted is not None
        self._interrupted.set()

    async def close(self) -> None:
        for relay in self.relays:
            relay.close()
        self.relays.clear()
        self._bound_specs.clear()

    async def run(self, session: Session, link: SecureLink) -> Ending:
        """Serve over one session until it ends (raises why) or either side stops."""
        assert self._interrupted is not None
        first = self._sessions == 0
        self._sessions += 1
        # Another session still running means this one replaces it (an upgrade to a direct
        # link): its -R listeners at the peer must close before we ask for them again here.
        for controls in self._controls.values():
            for control in controls:
                control.close()
        for spec, relay in zip(self._bound_specs, self.relays, strict=True):
            if first and isinstance(spec, ForwardSpec):
                target = endpoint(spec.host, spec.port)
                print(f"Forwarding {relay.bound} -> peer {target}", flush=True)
            elif first:
                print(f"Forwarding {relay.bound} -> peer (SOCKS: any target it allows)", flush=True)
            relay.attach(session)
        serving = _Serving(session)
        waiting: set[asyncio.Future] = {
            asyncio.ensure_future(self._serve(serving)),
            asyncio.ensure_future(self._interrupted.wait()),
        }
        requests = [r for r in self._remotes if not r.given_up]
        for remote in requests:
            waiting.add(asyncio.ensure_future(self._request_remote(session, remote, first)))
        self.path = link.path or "direct"
        if first:
            self.started_at = asyncio.get_running_loop().time()
            self._unanswered = len(requests)
            if not requests:
                self._ready()
        try:
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    result = task.result()  # a broken link, or a refused -R, ends it here
                    if result is True:  # the interrupt event
                        return Ending.BY_US
                    if isinstance(result, Ending):
                        return result
        finally:
            session.serve_streams(None)  # the peer's further opens wait, unanswered
            serving.closed = True
            for task in (*waiting, *serving.tasks):
                task.cancel()
            await asyncio.gather(*waiting, *serving.tasks, return_exceptions=True)
            for splice in list(serving.splices):
                splice.abort()
            for relay in self.relays:
                relay.detach(session)
            self.sent += session.bytes_sent
            self.received += session.bytes_received
            self.streams += session.streams_opened
            self._controls.pop(id(session), None)
            for key in [k for k in self._remote_by_stream if k[0] == id(session)]:
                del self._remote_by_stream[key]

    async def _serve(self, serving: _Serving) -> Ending:
        """Serve the peer's streams until it leaves (its go-away) or the link breaks."""
        serving.session.serve_streams(functools.partial(self._incoming, serving))
        await serving.session.peer_leaving()
        return Ending.BY_PEER

    # -- -R: we ask the peer to listen ------------------------------------------------------

    async def _request_remote(self, session: Session, remote: _Remote, first: bool) -> None:
        spec = remote.spec
        for attempt in range(REQUEST_RETRIES):
            answer, control = await self._listen_at_peer(session, remote)
            if isinstance(answer, preamble.Bound):
                if answer.port != remote.port:
                    where = endpoint(spec.bind_host, answer.port)
                    target = endpoint(spec.host, spec.port)
                    print(f"Forwarding peer {where} -> {target}", flush=True)
                remote.port = answer.port
                self._controls.setdefault(id(session), []).append(control)
                if first:
                    self._answered()
                return  # the control stream stays open: the peer listens while it is
            reason = answer.reason if isinstance(answer, preamble.Refuse) else repr(answer)
            del self._remote_by_stream[id(session), control.id]
            control.reset()
            if "in use" not in reason or attempt == REQUEST_RETRIES - 1:
                break
            await asyncio.sleep(REQUEST_RETRY_PAUSE)  # the listener of our last session
        if first and not self.keep_going:
            raise TeteError(f"the peer refused -R {spec.text}: {reason}")
        remote.given_up = first
        log.warning("warning: the peer refused -R %s: %s (going on without it)", spec.text, reason)
        if first:
            self._answered()

    def _answered(self) -> None:
        """One -R request of the first session was answered; the last one means ready."""
        self._unanswered -= 1
        if self._unanswered == 0:
            self._ready()

    def _ready(self) -> None:
        if self.on_ready is not None:
            on_ready, self.on_ready = self.on_ready, None
            on_ready()

    async def _listen_at_peer(
        self, session: Session, remote: _Remote
    ) -> tuple[preamble.Request | preamble.Answer, Stream]:
        spec = remote.spec
        control = session.open_stream()
        self._remote_by_stream[id(session), control.id] = spec  # before a FORWARDED names it
        port = spec.bind_port if remote.port is None else remote.port
        control.write(preamble.encode(preamble.Listen(spec.bind_host, port)))
        try:
            async with asyncio.timeout(PREAMBLE_TIMEOUT):
                return await preamble.read_message(control), control
        except TimeoutError:
            return preamble.Refuse("no answer from the peer"), control
        except preamble.PreambleError as exc:
            return preamble.Refuse(str(exc)), control

    # -- the peer's requests --------------------------------------------------------------

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """A line the peer can provoke once per stream: at most one per kind every 5 s."""
        self._throttled.warning(kind, asyncio.get_running_loop().time(), message, *args)

    def _incoming(self, serving: _Serving, stream: Stream) -> None:
        """A stream the peer opened (inside the session's dispatch): read its request."""
        stream.attach(_Opening(self, serving, stream))

    def _request(
        self, serving: _Serving, stream: Stream, request: preamble.Request | preamble.Answer
    ) -> None:
        """Serve the request that opened `stream`: a CONNECT to an IP address judged before
        goes straight to connecting, anything else through resolving and the policy."""
        if serving.closed:  # its run has ended: nothing more is served on this session
            stream.reset()
            return
        if isinstance(request, preamble.Connect):
            judged = self._judged.get((request.host, request.port))
            if judged is not None:
                addresses, refusal = judged
                if refusal is not None:
                    self._refuse_open(stream, request.host, request.port, refusal)
                    return
                work = self._connect(serving, stream, request.host, request.port, addresses)
                serving.start(self._guarded(stream, work))
                return
        serving.start(self._guarded(stream, self._serve_request(serving, stream, request)))

    async def _guarded(self, stream: Stream, work: Coroutine[Any, Any, None]) -> None:
        """Serve one stream; whatever happens ends this stream only."""
        try:
            await work
        except (Closed, LinkBroken):
            pass  # the session's end is reported once, by the supervisor
        except TeteError as exc:  # e.g. the peer reset the stream while we connected
            log.info("a stream from the peer ended: %s", exc)
            stream.reset()
        except Exception as exc:  # one stream's failure never ends the others
            self._warn("stream-failed", "a stream from the peer failed and was reset: %r", exc)
            log.debug("stream failure", exc_info=True)
            stream.reset()

    async def _serve_request(
        self, serving: _Serving, stream: Stream, request: preamble.Request | preamble.Answer
    ) -> None:
        match request:
            case preamble.Connect(host, port):
                await self._serve_connect(serving, stream, host, port)
            case preamble.Listen(host, port):
                await self._serve_listen(serving.session, stream, host, port)
            case preamble.Forwarded(listener_id):
                await self._serve_forwarded(serving, stream, listener_id)
            case _:
                preamble.refuse(stream, "this peer runs `tete-tunnel forward`, not `pipe`")

    async def _serve_connect(self, serving: _Serving, stream: Stream, host: str, port: int) -> None:
        try:
            addresses = await resolve(host, port)
        except TeteError as exc:
            preamble.refuse(stream, str(exc))
            return
        refusal = self.policy.open_refusal(host, port, [a.ip for a in addresses])
        if is_ip_literal(host):  # the same answer every time: judge it once
            if len(self._judged) >= JUDGED_LIMIT:
                self._judged.clear()
            self._judged[host, port] = (addresses, refusal)
        if refusal is not None:
            self._refuse_open(stream, host, port, refusal)
            return
        await self._connect(serving, stream, host, port, addresses)

    def _refuse_open(self, stream: Stream, host: str, port: int, refusal: str) -> None:
        self._warn(
            "refused-open", "refused the peer's request to connect to %s", endpoint(host, port)
        )
        preamble.refuse(stream, refusal)

    async def _serve_forwarded(self, serving: _Serving, stream: Stream, listener_id: int) -> None:
        spec = self._remote_by_stream.get((id(serving.session), listener_id))
        if spec is None:
            preamble.refuse(stream, f"no -R forward with id {listener_id} here")
            return
        try:
            addresses = await resolve(spec.host, spec.port)
        except TeteError as exc:
            self._warn("resolve", "-R %s: %s", spec.text, exc)
            preamble.refuse(stream, str(exc))
            return
        label = f"-R {spec.text}"
        await self._connect(serving, stream, spec.host, spec.port, addresses, label)

    async def _connect(
        self,
        serving: _Serving,
        stream: Stream,
        host: str,
        port: int,
        addresses: list[Address],
        label: str = "the peer's -L",
    ) -> None:
        """Connect to the target and splice it to `stream`; the splice outlives this task
        (it lives on callbacks, owned by `serving`), and its end is logged here."""

        def ended(splice: Splice, error: BaseException | None) -> None:
            serving.splices.discard(splice)
            if error is None or session_ended(error):
                return
            if isinstance(error, TeteError):
                log.info("%s: connection to %s ended: %s", label, endpoint(host, port), error)
            else:
                self._warn(
                    "stream-failed", "a stream from the peer failed and was reset: %r", error
                )
                log.debug("stream failure", exc_info=error)
                stream.reset()

        try:
            splice = await connect_splice(
                stream,
                host,
                port,
                [(a.family, a.sockaddr) for a in addresses],
                answer=ACCEPT,
                per_address=CONNECT_TIMEOUT,
                on_end=ended,
            )
        except ConnectFailed as exc:
            self._warn("connect-failed", "%s: %s", label, exc)
            preamble.refuse(stream, str(exc))
            return
        if not splice.ended:
            serving.splices.add(splice)

    async def _serve_listen(self, session: Session, stream: Stream, host: str, port: int) -> None:
        """Listen for the peer while its control stream is open; each connection goes back."""
        try:
            addresses = await resolve(host, port, passive=True)
        except TeteError as exc:
            preamble.refuse(stream, str(exc))
            return
        refusal = self.policy.listen_refusal(host, port, [a.ip for a in addresses])
        if refusal is not None:
            self._warn(
                "refused-listen", "refused the peer's request to listen on %s", endpoint(host, port)
            )
            preamble.refuse(stream, refusal)
            return
        try:
            sock = listen_on(addresses[0], LISTEN_BACKLOG)  # the address checked, not the name
        except TeteError as exc:
            self._warn("listen-failed", "the peer's -R: %s", exc)
            preamble.refuse(stream, str(exc))
            return
        bound = sock.getsockname()[1]
        label = f"the peer's -R on {endpoint(host, bound)}"
        relay = Relay(
            sock, preamble.Forwarded(stream.id), label, max_connections=self.max_connections
        )
        try:
            await relay.start()
            relay.attach(session)
            log.info("listening on %s for the peer", endpoint(host, bound))
            stream.write(preamble.encode(preamble.Bound(bound)))
            await _until_stream_end(stream)  # the peer closed the forward
            await relay.stop_accepting_and_drain()  # its connections may finish
        finally:
            relay.close()
            log.info("stopped listening on %s", endpoint(host, bound))


async def _until_stream_end(stream: Stream) -> None:
    with contextlib.suppress(TeteError):
        while await stream.read():
            pass
