"""An attacker against a real `tete-tunnel` process: a stranger, a guesser, a man in the
middle, or an authenticated peer that is lawless.

The victim is the real tool, run as a process (`forward` or `pipe`); the attacker is this
test process. At the handshake level it speaks HELLO / FINISH / REFUSE by hand on a raw
socket, as a stranger on the port or a man in the middle could. At the mux level it gets a
genuine authenticated link with the library's own connector (so the handshake is not what
is under test) and then, instead of running a Session, writes and reads raw mux frames on
the TLS transport: it may open streams faster than anyone should, reset them at once, never
grant window, never read, answer with any text. Three layers, kept apart so that each
reuses the one before:

Link level (the process and getting a connection or an authenticated link to it)
    victim = start_victim(procs, tmp, command, *extra, stdin=None, name="victim",
                          timeout=60)           `COMMAND --peer-ip 127.0.0.1 --lport P
                                                --rport Q --identity tmp/name ...`
                                                (unverified unless extra says otherwise)
    honest = start_forward(procs, tmp, *extra_args)    `forward` so (name "honest")
    victim = start_pipe(procs, tmp, *extra, stdin=b"...")   `pipe` so, stdin from bytes
    victim.alive(), .peak_rss_kib(), .rss_kib(), .err, .pid   the process as tests judge it
    victim.identity()                   its Identity (create tmp/name with load_or_create
                                        before starting it to know it beforehand)
    peer_args(victim)                   the connection arguments of its real peer
    sock = await punch_to(victim, deadline)    a raw TCP socket to its punch port, punched
                                        as its peer would (our lport Q, rport P): one 4-tuple
    sock = await connect_to(victim)     a raw TCP socket to its punch port from an ephemeral
                                        port of ours (still the peer's address, so it is
                                        handshaken): several can be open at once
    link = await link_to(victim, identity_dir)   DirectConnector with the identity in
                                        identity_dir (created if new), unverified: an
                                        authenticated SecureLink (carrier = TLS transport).
                                        `forward` pins its first peer: come back with the
                                        same identity_dir.
    (`HonestForward` is the old name of `Victim`.)

Handshake level (a raw socket from punch_to / connect_to, before any authentication; each
function closes the socket when done; `within` bounds each wait (default 10 s, the victim's
own pre-authentication deadline); `seen=bytearray()` collects every byte read; NoAnswer
when the victim does not answer as a peer would: closed, reset, REFUSE, silence, garbage)
    right = await guess_code(sock, identity, guess, linger=0.0)
                                        HELLO with a SPAKE2 message for `guess`
                                        (SPAKE2_Symmetric, idSymmetric b"tete-tunnel/1" as in
                                        secure.py); reads its HELLO and FINISH, checks its
                                        key-confirmation MAC offline (HMAC over both HELLOs,
                                        docs/PROTOCOL.md §4.6), reads on for `linger` s and
                                        closes without our FINISH: True if the guess was right
    dropped = await echo_hello(sock)    its HELLO sent back byte for byte (an echo service);
                                        True if it then closed the connection
    dropped = await send_refuse(sock, reason)   its HELLO read, REFUSE(reason) (any byte)
                                        sent, our side shut: True if it then closed
    reason = await hello_with(sock, identity)   HELLO with that certificate (another one,
                                        or the victim's own), no code message; its answer
                                        read and the connection closed without our FINISH:
                                        its REFUSE reason, or None if it sent FINISH
    held = await stall(sock, within=20) nothing sent at all: seconds until the victim closed
                                        the connection, None if it had not within `within`
    code = await grind_safety_code(sock, identity)   a full HELLO + FINISH exchange in
                                        unverified mode, dropped before TLS: the victim
                                        revealed its nonce (checked against its commitment),
                                        so that attempt's safety code (returned) is known to
                                        the attacker, as a man in the middle retrying to
                                        match codes would learn it
    Lower bricks: read_message, read_hello, read_finish, make_hello, confirmation,
    until_closed.

Mux level (raw frames over that link)
    mux = RawMux(link)                  takes the TLS transport over (set_protocol), decodes
                                        every frame (FrameDecoder), answers pings (unless
                                        answer_pings=False), refuses streams the honest side
                                        opens (ACK|RST; refuse_peer_opens=False: keeps them
                                        for us to answer), counts everything in `mux.stats`
    sid = mux.open(payload, fin=False, window=0, track=True, auto_grant=False)
                                        a new stream id of our parity (TLS client: odd),
                                        strictly increasing: DATA|SYN with the payload, or
                                        WINDOW_UPDATE|SYN (delta `window`) when it is empty
    mux.data(sid, payload, fin=False)   within the stream's send window (tracked streams)
    mux.window_update(sid, delta), mux.fin(sid), mux.rst(sid), mux.ping(opaque),
    mux.go_away(code), mux.send_frame(type, flags, sid, length, payload)   (anything at all)
    await mux.drain()                   flush, and wait while the transport is full
    await mux.sync()                    ping and await the pong: everything sent before it
                                        has been processed (paces a flood to the honest
                                        side's speed; False if no pong came in time)
    mux.pause_reading() / resume_reading()   stop reading the TLS socket altogether
    await mux.read_frame(within)       the next frame received (keep_frames=True only)
    await mux.wait_for(predicate, within)   until it holds after some input; False if not
    mux.streams[sid]                    RawStream: data, received, granted, send_window,
                                        acked, fin, rst, refused (ACK|RST before any ACK)
    mux.peer_data[sid]                  what arrived on a stream the honest side opened
                                        (refuse_peer_opens=False only)
    mux.peer_request(sid)               its open request, decoded, once it has all arrived
    mux.answer(sid, answer, fin=True)   accept it (ACK) with a preamble answer of our choice
                                        as the first data: Accept, Bound, Refuse(any text)
    mux.stats                           MuxStats: frames by kind, refused (our opens answered
                                        ACK|RST), accepted / holding (untracked opens ACKed,
                                        not reset since), resets, fins, data_bytes, goaway
                                        (its code), peer_opens, violations (frames the honest
                                        side must not send: data beyond the window granted,
                                        after FIN, on ids never opened)
    await mux.aclose()                  GO_AWAY(0), await the honest side's, close (abort if
                                        it will not end)

Frames are batched: every send appends to a buffer written once per loop turn (or by
drain()), so a flood of small frames becomes large TLS records, as a fast attacker's would.
A write of up to 16 KiB is one TLS record, which the honest side always reads in one batch.
Streams opened with track=False cost nothing here: their answers are only counted.

Pacing: the honest side treats more than 1,024 replies owed at once (pongs, ACK|RST
refusals) as a protocol error that ends the session (docs/PROTOCOL.md §6.9). A flood meant
to go on must therefore sync() after every 1,000 or so frames that may be refused.

A well-behaved stream through the same session
    result = await echo_stream(mux, host, port, payload)
        opens a stream with CONNECT host port and as much payload as the window allows,
        sends the rest as window updates come, then FIN; grants window as it reads; returns
        the answer (ACCEPT or REFUSE), the bytes echoed, whether FIN / RST / a mux refusal
        came, and how long it took. `result.ok(payload)` is the whole check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import spake2

from tests.helpers import Proc, Procs, free_ports, pair_args
from tete_tunnel import hello as msg
from tete_tunnel import preamble
from tete_tunnel.connector import DirectConnector, LinkConfig
from tete_tunnel.errors import HandshakeError
from tete_tunnel.identity import Identity, fingerprint, load_or_create
from tete_tunnel.mux.connection import INITIAL_WINDOW
from tete_tunnel.mux.frames import MAX_PAYLOAD, Flag, Frame, FrameDecoder, FrameType, encode_header
from tete_tunnel.punch import listen, punch
from tete_tunnel.secure import PREAUTH_TIMEOUT, SPAKE_ID, SecureLink, safety_code

LOOPBACK = "127.0.0.1"

# -- link level ------------------------------------------------------------------------------


@dataclass
class Victim:
    """A tool process (`forward` or `pipe`) punching from `lport` to our `rport`."""

    proc: Proc
    lport: int  # its --lport: where we dial
    rport: int  # its --rport: our port
    identity_dir: Path  # its --identity

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def err(self) -> str:
        return self.proc.err

    def alive(self) -> bool:
        return self.proc.popen.poll() is None

    def identity(self) -> Identity:
        """Its identity (the same file the process loads: its certificate, its ID)."""
        return load_or_create(self.identity_dir)

    def _status(self, field_name: str) -> int:
        """A VmXXX figure from /proc/PID/status, in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field_name} in /proc/{self.pid}/status")

    def peak_rss_kib(self) -> int:
        """VmHWM: the largest resident set the process has had."""
        return self._status("VmHWM")

    def rss_kib(self) -> int:
        return self._status("VmRSS")


HonestForward = Victim  # the name the hostile-peer tests know it by


def start_victim(
    procs: Procs,
    tmp: Path,
    command: str,
    *extra: str,
    stdin: bytes | None = None,
    name: str = "victim",
    timeout: float = 60.0,
) -> Victim:
    """Start `command` (pipe or forward) on loopback, waiting for us; unverified unless
    `extra` says otherwise (--peer-id, --code). Its identity is `tmp / name`: create it
    first (load_or_create) to know its certificate before it starts."""
    lport, rport = free_ports(2)
    args, _ = pair_args(lport, rport)
    identity_dir = tmp / name
    proc = procs.start(
        [command, *args, "--identity", str(identity_dir), "--timeout", f"{timeout:g}", *extra],
        stdin=stdin,
        name=name,
    )
    return Victim(proc, lport, rport, identity_dir)


def start_forward(procs: Procs, tmp: Path, *extra: str, name: str = "honest") -> Victim:
    """Start the honest side: `forward` in unverified mode on loopback, waiting for us."""
    return start_victim(procs, tmp, "forward", *extra, name=name)


def start_pipe(
    procs: Procs,
    tmp: Path,
    *extra: str,
    stdin: bytes = b"",
    name: str = "victim",
    timeout: float = 60.0,
) -> Victim:
    """Start `pipe` on loopback with `stdin` as its input, waiting for us."""
    return start_victim(procs, tmp, "pipe", *extra, stdin=stdin, name=name, timeout=timeout)


def peer_args(victim: Victim) -> list[str]:
    """The connection arguments of the victim's real peer (our ports, its as the remote)."""
    return ["--peer-ip", LOOPBACK, "--lport", str(victim.rport), "--rport", str(victim.lport)]


async def punch_to(victim: Victim, deadline: float) -> socket.socket:
    """A raw, connected TCP socket to the victim's punch port (no handshake yet), punched
    as its peer would: from our port `rport` to its `lport`."""
    listener = listen(socket.AF_INET, victim.rport)
    try:
        return await punch(LOOPBACK, victim.lport, victim.rport, deadline, listener=listener)
    finally:
        listener.close()


async def connect_to(victim: Victim, within: float = 5.0) -> socket.socket:
    """A raw, connected TCP socket to the victim's punch port from an ephemeral port of
    ours: it comes from the peer's address, so the victim handshakes it like the peer's,
    and unlike `punch_to` (one 4-tuple) several can be open at once."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(within):
            await loop.sock_connect(sock, (LOOPBACK, victim.lport))
    except BaseException:
        sock.close()
        raise
    return sock


async def link_to(victim: Victim, identity_dir: Path, within: float = 30.0) -> SecureLink:
    """An authenticated link to the victim, made by the library's own connector."""
    identity = load_or_create(identity_dir)
    config = LinkConfig(
        peer_ip=LOOPBACK, local_port=victim.rport, peer_port=victim.lport, timeout=within
    )
    loop = asyncio.get_running_loop()
    return await DirectConnector(config, identity).connect(loop.time() + within)


# -- handshake level -------------------------------------------------------------------------

HANDSHAKE_WITHIN = PREAUTH_TIMEOUT  # how long the victim itself gives a handshake


class NoAnswer(Exception):
    """The victim did not answer as a peer would: it closed or reset the connection, sent
    REFUSE or something that is not tete-tunnel, or nothing in time (the message says)."""


async def _send(sock: socket.socket, data: bytes) -> None:
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except OSError as exc:
        raise NoAnswer(f"sending failed: {exc!r}") from exc


async def _recv_exactly(
    sock: socket.socket, n: int, deadline: float, what: str, seen: bytearray | None
) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                chunk = await loop.sock_recv(sock, n - len(buf))
        except TimeoutError:
            raise NoAnswer(f"no {what} in time ({len(buf)} of {n} bytes)") from None
        except OSError as exc:
            raise NoAnswer(f"the connection failed while waiting for {what}: {exc!r}") from exc
        if not chunk:
            raise NoAnswer(f"the victim closed the connection (waiting for {what})")
        buf += chunk
        if seen is not None:
            seen += chunk
    return bytes(buf)


async def read_message(
    sock: socket.socket, *, within: float = HANDSHAKE_WITHIN, seen: bytearray | None = None
) -> tuple[msg.MessageType, bytes, bytes]:
    """The victim's next pre-TLS message: its type, its body, and the whole message as sent
    (header included, as the key confirmation hashes it)."""
    deadline = asyncio.get_running_loop().time() + within
    header = await _recv_exactly(sock, msg.HEADER_SIZE, deadline, "a message", seen)
    try:
        kind, length = msg.parse_header(header)
    except HandshakeError as exc:
        raise NoAnswer(f"not a tete-tunnel message: {exc}") from exc
    body = await _recv_exactly(sock, length, deadline, f"a {kind.name} body", seen)
    return kind, body, header + body


def _refused_or_not(kind: msg.MessageType, body: bytes, expected: msg.MessageType) -> None:
    if kind == msg.MessageType.REFUSE:
        raise NoAnswer(f"it sent REFUSE({msg.parse_refuse(body).reason}), not {expected.name}")
    if kind != expected:
        raise NoAnswer(f"it sent {kind.name}, not {expected.name}")


async def read_hello(
    sock: socket.socket, *, within: float = HANDSHAKE_WITHIN, seen: bytearray | None = None
) -> tuple[bytes, msg.Hello]:
    """The victim's HELLO: the whole message as sent, and parsed."""
    kind, body, whole = await read_message(sock, within=within, seen=seen)
    _refused_or_not(kind, body, msg.MessageType.HELLO)
    return whole, msg.parse_hello(body)


async def read_finish(
    sock: socket.socket,
    hello: msg.Hello,
    *,
    within: float = HANDSHAKE_WITHIN,
    seen: bytearray | None = None,
) -> msg.Finish:
    """The victim's FINISH, its nonce checked against the commitment in its `hello`."""
    kind, body, _ = await read_message(sock, within=within, seen=seen)
    _refused_or_not(kind, body, msg.MessageType.FINISH)
    finish = msg.parse_finish(body)
    if hashlib.sha256(finish.nonce).digest() != hello.commitment:
        raise NoAnswer("its nonce does not match the commitment in its HELLO")
    return finish


def make_hello(identity: Identity, spake_message: bytes = b"") -> tuple[bytes, bytes]:
    """A HELLO of ours with `identity`'s certificate: the message and the nonce it commits to."""
    nonce = os.urandom(msg.NONCE_SIZE)
    hello = msg.Hello(hashlib.sha256(nonce).digest(), identity.cert_der, spake_message)
    return msg.encode_hello(hello), nonce


def confirmation(key: bytes, sender_fp: bytes, hellos: list[tuple[bytes, bytes]]) -> bytes:
    """MAC(sender) of docs/PROTOCOL.md §4.6; `hellos` = both (fingerprint, HELLO message)."""
    (_, lo), (_, hi) = sorted(hellos)
    transcript = hashlib.sha256(lo + hi).digest()
    return hmac.new(key, b"tete-tunnel confirm" + sender_fp + transcript, hashlib.sha256).digest()


async def until_closed(sock: socket.socket, within: float, seen: bytearray | None = None) -> bool:
    """Read (and record) whatever comes until the victim closes or resets the connection;
    False if it was still open after `within` seconds."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            while chunk := await loop.sock_recv(sock, 65536):
                if seen is not None:
                    seen += chunk
    except TimeoutError:
        return False
    except OSError:
        pass  # a reset: closed all the same
    return True


async def guess_code(
    sock: socket.socket,
    identity: Identity,
    guess: str,
    *,
    within: float = HANDSHAKE_WITHIN,
    linger: float = 0.0,
    seen: bytearray | None = None,
) -> bool:
    """One online guess at a --code victim's code: our HELLO with a SPAKE2 message for
    `guess`, then its HELLO. The TLS server speaks first (docs/PROTOCOL.md §4.5): when the
    victim is the server, its FINISH comes at once and its MAC is checked offline (what an
    attacker takes home), and we close without our FINISH; when we are the server, we must
    send our FINISH, with a MAC for `guess`, and the victim answers with its own only if the
    guess was right. We read on for `linger` seconds before closing.
    True if the guess was right. NoAnswer if a victim that is the TLS server never sent its
    FINISH."""
    try:
        spake = spake2.SPAKE2_Symmetric(guess.encode("utf-8"), idSymmetric=SPAKE_ID)
        ours, nonce = make_hello(identity, spake.start())
        await _send(sock, ours)
        theirs, hello = await read_hello(sock, within=within, seen=seen)
        if not hello.spake_message:
            raise NoAnswer("its HELLO carries no code message: it does not use --code")
        key = spake.finish(hello.spake_message)
        victim_fp = fingerprint(hello.cert_der)
        hellos = [(identity.fingerprint, ours), (victim_fp, theirs)]
        if identity.fingerprint > victim_fp:  # we are the TLS server: we speak first
            mac = confirmation(key, identity.fingerprint, hellos)
            await _send(sock, msg.encode_finish(msg.Finish(nonce, mac)))
            try:
                finish = await read_finish(sock, hello, within=within, seen=seen)
            except NoAnswer:
                return False  # it checked our MAC, found a different code, and said nothing
        else:
            finish = await read_finish(sock, hello, within=within, seen=seen)
        if linger:
            await until_closed(sock, linger, seen)
        return hmac.compare_digest(finish.mac, confirmation(key, victim_fp, hellos))
    finally:
        sock.close()


async def echo_hello(
    sock: socket.socket, *, within: float = HANDSHAKE_WITHIN, seen: bytearray | None = None
) -> bool:
    """Read the victim's HELLO and send it back byte for byte, as an echo service would;
    True if the victim then dropped the connection within `within` seconds."""
    try:
        theirs, _ = await read_hello(sock, within=within, seen=seen)
        await _send(sock, theirs)
        return await until_closed(sock, within, seen)
    finally:
        sock.close()


async def send_refuse(
    sock: socket.socket,
    reason: int,
    *,
    within: float = HANDSHAKE_WITHIN,
    seen: bytearray | None = None,
) -> bool:
    """Read the victim's HELLO and answer REFUSE(reason) (any byte: unknown reasons too),
    as a peer that will not have it does; True if the victim then dropped the connection
    within `within` seconds (our writing side is shut first, so no reset destroys the
    REFUSE)."""
    try:
        await read_hello(sock, within=within, seen=seen)
        header = msg.HEADER.pack(msg.MAGIC, msg.VERSION, msg.MessageType.REFUSE, 1)
        await _send(sock, header + bytes([reason]))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        return await until_closed(sock, within, seen)
    finally:
        sock.close()


async def hello_with(
    sock: socket.socket,
    identity: Identity,
    *,
    within: float = HANDSHAKE_WITHIN,
    seen: bytearray | None = None,
) -> int | None:
    """A HELLO with `identity`'s certificate (another one, or the victim's own), no code
    message; then close without our FINISH. Returns the reason of the victim's REFUSE, or
    None if it answered FINISH (it took the certificate and revealed its nonce: only a
    victim that is the TLS server, docs/PROTOCOL.md §4.5, sends it unasked)."""
    try:
        ours, _ = make_hello(identity)
        await _send(sock, ours)
        await read_hello(sock, within=within, seen=seen)
        kind, body, _ = await read_message(sock, within=within, seen=seen)
        if kind == msg.MessageType.REFUSE:
            return msg.parse_refuse(body).reason
        _refused_or_not(kind, body, msg.MessageType.FINISH)
        return None
    finally:
        sock.close()


async def stall(
    sock: socket.socket, *, within: float = 2 * HANDSHAKE_WITHIN, seen: bytearray | None = None
) -> float | None:
    """Send nothing at all (the victim's HELLO is read and recorded); the seconds until the
    victim closed the connection, or None if it was still open after `within`."""
    started = time.monotonic()
    try:
        if await until_closed(sock, within, seen):
            return time.monotonic() - started
        return None
    finally:
        sock.close()


async def grind_safety_code(
    sock: socket.socket,
    identity: Identity,
    *,
    within: float = HANDSHAKE_WITHIN,
    seen: bytearray | None = None,
) -> str:
    """One attempt of a man in the middle at matching an unverified victim's safety code: a
    full HELLO + FINISH exchange (no code message), then drop before TLS. The victim has
    revealed its nonce (checked against its commitment), so that attempt's safety code is
    known here and returned; the victim drew one and must count it."""
    try:
        ours, nonce = make_hello(identity)
        await _send(sock, ours)
        _, hello = await read_hello(sock, within=within, seen=seen)
        await _send(sock, msg.encode_finish(msg.Finish(nonce, b"")))
        finish = await read_finish(sock, hello, within=within, seen=seen)
        return safety_code(identity.fingerprint, nonce, fingerprint(hello.cert_der), finish.nonce)
    finally:
        sock.close()


# -- mux level -------------------------------------------------------------------------------

_SYN, _ACK, _FIN, _RST = Flag.SYN, Flag.ACK, Flag.FIN, Flag.RST


@dataclass(slots=True)
class RawStream:
    """What we know of one stream we opened (track=True)."""

    id: int
    keep_data: bool = True
    auto_grant: bool = False  # consume at once and grant back, like a reader that keeps up
    data: bytearray = field(default_factory=bytearray)
    received: int = 0  # DATA payload bytes from the honest side
    granted: int = INITIAL_WINDOW  # all the credit we gave: the initial window + updates
    unacked: int = 0  # consumed, not yet granted back (auto_grant)
    send_window: int = INITIAL_WINDOW  # what we may still send
    acked: bool = False
    fin: bool = False  # its FIN arrived
    rst: bool = False  # its RST arrived (refusals included)
    refused: bool = False  # ACK|RST before any ACK: a mux-level refusal of our open
    fin_sent: bool = False


@dataclass
class MuxStats:
    frames: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # "WINDOW_UPDATE ACK|RST": n
    refused: int = 0  # our opens refused with ACK|RST
    resets: int = 0  # other RSTs on our streams
    fins: int = 0
    data_bytes: int = 0
    pongs_sent: int = 0
    peer_opens: list[int] = field(default_factory=list)  # streams the honest side opened
    accepted: int = 0  # untracked opens of ours it accepted (ACK without RST)
    # Those of them not reset since: what a flood holds open (a FIN does not remove one).
    holding: set[int] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)  # what the honest side did wrong
    goaway: int | None = None  # the code of its GO_AWAY, if one came


def _kind(frame: Frame) -> str:
    flags = "|".join(f.name for f in (_SYN, _ACK, _FIN, _RST) if frame.flags & f) or "-"
    return f"{frame.type.name} {flags}"


class RawMux(asyncio.Protocol):
    """Raw frames over an authenticated link; see the module docstring."""

    def __init__(
        self,
        link: SecureLink,
        *,
        keep_frames: bool = True,
        answer_pings: bool = True,
        refuse_peer_opens: bool = True,
    ) -> None:
        carrier = link.carrier
        assert carrier.transport is not None
        self.link = link
        self.transport: asyncio.Transport = carrier.transport
        self.client = link.is_tls_client
        self.keep_frames = keep_frames
        self.answer_pings = answer_pings
        self.refuse_peer_opens = refuse_peer_opens
        self.streams: dict[int, RawStream] = {}
        self.peer_data: dict[int, bytearray] = {}  # the honest side's streams, kept
        self.stats = MuxStats()
        self.frames: deque[Frame] = deque()
        self.pongs: set[int] = set()  # opaque values of the pongs received
        self._ping_opaque = 1 << 31  # ours, far from the small values the honest side uses
        self.lost = False
        self.lost_error: BaseException | None = None
        self.eof = False
        self._next_id = 1 if self.client else 2
        self._decoder = FrameDecoder()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.transport.set_protocol(self)
        if carrier.buffer:  # what came right after READY (its first PING)
            self.data_received(bytes(carrier.buffer))
            carrier.buffer.clear()
        if carrier.closed:
            self.connection_lost(carrier.error)
        elif carrier.eof:
            self.eof_received()

    # -- protocol callbacks ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        try:
            while (frame := self._decoder.next_frame()) is not None:
                self._on_frame(frame)
        except Exception as exc:  # a frame no peer may send: the honest side's fault
            self.stats.violations.append(f"undecodable input: {exc}")
            self._decoder = FrameDecoder()
        self._changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self._changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_error = exc
        self._writable.set()
        self._changed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- input --------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        stats = self.stats
        stats.frames += 1
        stats.kinds[_kind(frame)] += 1
        if self.keep_frames:
            self.frames.append(frame)
        if frame.type is FrameType.PING:
            if frame.flags & _SYN:
                if self.answer_pings:
                    self.send_frame(FrameType.PING, _ACK, 0, frame.length)
                    stats.pongs_sent += 1
            elif frame.flags & _ACK:
                self.pongs.add(frame.length)
            return
        if frame.type is FrameType.GO_AWAY:
            stats.goaway = frame.length
            return
        sid, flags = frame.stream_id, frame.flags
        if (sid % 2 == 1) != self.client:  # the honest side's own stream
            if flags & _SYN:
                stats.peer_opens.append(sid)
                if self.refuse_peer_opens:
                    self.send_frame(FrameType.WINDOW_UPDATE, _ACK | _RST, sid, 0)
                else:
                    self.peer_data[sid] = bytearray()
            if frame.type is FrameType.DATA and sid in self.peer_data:
                self.peer_data[sid] += frame.payload
            return
        if sid >= self._next_id:
            stats.violations.append(f"{_kind(frame)} on stream {sid}, which we never opened")
            return
        if flags & _SYN:
            stats.violations.append(f"SYN on our own stream {sid}")
        stream = self.streams.get(sid)
        if frame.type is FrameType.DATA:
            stats.data_bytes += frame.length
        if flags & _FIN:
            stats.fins += 1
        if flags & _RST:
            acked = stream.acked if stream is not None else sid in stats.holding
            if flags & _ACK and not acked:
                stats.refused += 1
            else:
                stats.resets += 1
        if stream is None:
            if flags & _RST:
                stats.holding.discard(sid)
            elif flags & _ACK:
                stats.accepted += 1
                stats.holding.add(sid)
            return
        if flags & _RST:
            stream.refused = bool(flags & _ACK) and not stream.acked
            stream.rst = True
        if flags & _ACK:
            stream.acked = True
        if frame.type is FrameType.WINDOW_UPDATE:
            stream.send_window += frame.length
        elif frame.length:
            if stream.fin:
                stats.violations.append(f"stream {sid}: data after its FIN")
            stream.received += frame.length
            if stream.received > stream.granted:
                stats.violations.append(
                    f"stream {sid}: {stream.received} bytes sent, {stream.granted} granted"
                )
            if stream.keep_data:
                stream.data += frame.payload
            if stream.auto_grant:  # no credit is due once its FIN came
                stream.unacked += frame.length
                if stream.unacked >= INITIAL_WINDOW // 2 and not flags & _FIN:
                    self.window_update(sid, stream.unacked)
                    stream.unacked = 0
        if flags & _FIN:
            stream.fin = True

    # -- output -------------------------------------------------------------------------

    def send_frame(
        self, type_: FrameType, flags: Flag | int, stream_id: int, length: int, payload: bytes = b""
    ) -> None:
        """Any frame at all, unchecked (for frames that break the rules on purpose)."""
        self._out.append(encode_header(type_, Flag(flags), stream_id, length))
        if payload:
            self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send_raw(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.lost and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    async def drain(self) -> None:
        """Write what is queued; wait while the transport's buffer is over its high mark.
        Always yields once, so that what the honest side sent is read meanwhile."""
        self.flush()
        await asyncio.sleep(0)
        await self._writable.wait()

    def next_stream_id(self) -> int:
        stream_id = self._next_id
        self._next_id += 2
        return stream_id

    def open(
        self,
        payload: bytes = b"",
        *,
        fin: bool = False,
        window: int = 0,
        track: bool = True,
        auto_grant: bool = False,
        keep_data: bool = True,
    ) -> int:
        """Open the next stream: SYN on DATA with `payload`, else on a WINDOW_UPDATE."""
        if len(payload) > min(INITIAL_WINDOW, MAX_PAYLOAD):
            raise ValueError("a first frame larger than the initial window")
        sid = self.next_stream_id()
        flags = _SYN | (_FIN if fin else Flag.NONE)
        if payload:
            self.send_frame(FrameType.DATA, flags, sid, len(payload), payload)
        else:
            self.send_frame(FrameType.WINDOW_UPDATE, flags, sid, window)
        if track:
            self.streams[sid] = RawStream(
                sid,
                keep_data=keep_data,
                auto_grant=auto_grant,
                granted=INITIAL_WINDOW + window * (not payload),
                send_window=INITIAL_WINDOW - len(payload),
                fin_sent=fin,
            )
        return sid

    def data(self, sid: int, payload: bytes, *, fin: bool = False) -> None:
        """DATA on a stream, within its send window when it is tracked."""
        stream = self.streams.get(sid)
        if stream is not None:
            if len(payload) > stream.send_window:
                raise ValueError(f"stream {sid}: {len(payload)} bytes, window {stream.send_window}")
            stream.send_window -= len(payload)
            stream.fin_sent |= fin
        for start in range(0, max(len(payload), 1), MAX_PAYLOAD):
            part = payload[start : start + MAX_PAYLOAD]
            last = start + MAX_PAYLOAD >= len(payload)
            flags = _FIN if fin and last else Flag.NONE
            self.send_frame(FrameType.DATA, flags, sid, len(part), part)

    def peer_request(self, sid: int) -> preamble.Request | preamble.Answer | None:
        """The open request on a stream the honest side opened; None until it has arrived."""
        request, _ = _split_answer(bytes(self.peer_data.get(sid, b"")))
        return request

    def answer(self, sid: int, answer: preamble.Answer, *, fin: bool = True) -> None:
        """Accept a stream the honest side opened (ACK) with `answer` as our first data."""
        payload = preamble.encode(answer)
        flags = _ACK | (_FIN if fin else Flag.NONE)
        self.send_frame(FrameType.DATA, flags, sid, len(payload), payload)

    def window_update(self, sid: int, delta: int, flags: Flag = Flag.NONE) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            stream.granted += delta
        self.send_frame(FrameType.WINDOW_UPDATE, flags, sid, delta)

    def fin(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            stream.fin_sent = True
        self.send_frame(FrameType.WINDOW_UPDATE, _FIN, sid, 0)

    def rst(self, sid: int) -> None:
        self.send_frame(FrameType.WINDOW_UPDATE, _RST, sid, 0)

    def ping(self, opaque: int, *, ack: bool = False) -> None:
        self.send_frame(FrameType.PING, _ACK if ack else _SYN, 0, opaque)

    def go_away(self, code: int = 0) -> None:
        self.send_frame(FrameType.GO_AWAY, Flag.NONE, 0, code)

    # -- reading control ------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading the TLS socket: its buffers, then the honest side's, fill up."""
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> bool:
        """Until `predicate()` holds (checked after every input); False after `within`
        seconds or when the connection is gone without it."""
        deadline = self._loop.time() + within
        while not predicate():
            if self.lost:
                return predicate()
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        return True

    async def sync(self, within: float = 30.0) -> bool:
        """Ping and wait for the pong: the honest side has then processed everything we
        sent before it (frames are handled in order) and flushed its answers."""
        self._ping_opaque += 1
        opaque = self._ping_opaque
        self.ping(opaque)
        self.flush()
        ok = await self.wait_for(lambda: opaque in self.pongs, within)
        self.pongs.discard(opaque)
        return ok

    async def read_frame(self, within: float) -> Frame | None:
        """The next frame received (needs keep_frames=True); None after `within` s or the end."""
        assert self.keep_frames, "frames are only kept with keep_frames=True"
        await self.wait_for(lambda: bool(self.frames), within)
        return self.frames.popleft() if self.frames else None

    async def aclose(self, linger: float = 10.0) -> None:
        """End the session in order: GO_AWAY(0), then read on until the honest side's
        go-away (its receipt) or the end of the connection, then close; abort if it will
        not end. Closing earlier, with its data still unread, would send a TCP RST that can
        destroy our GO_AWAY in its receive queue: it would see a reset, not a goodbye."""
        if not self.lost:
            self.go_away(0)
            self.flush()
            await self.wait_for(lambda: self.stats.goaway is not None or self.eof, linger)
            self.transport.close()
            await self.wait_for(lambda: self.lost, linger)
        if not self.lost:
            self.transport.abort()
            await self.wait_for(lambda: self.lost, 1.0)


# -- a well-behaved stream ---------------------------------------------------------------------


@dataclass
class EchoResult:
    stream_id: int
    answer: preamble.Answer | preamble.Request | None
    echoed: bytes
    fin: bool
    reset: bool
    refused: bool  # a mux-level refusal (ACK|RST) of the open
    seconds: float

    def ok(self, payload: bytes) -> bool:
        return (
            isinstance(self.answer, preamble.Accept)
            and self.echoed == payload
            and self.fin
            and not self.reset
        )

    def describe(self) -> str:
        return (
            f"stream {self.stream_id}: answer {self.answer!r}, {len(self.echoed)} bytes echoed, "
            f"fin {self.fin}, reset {self.reset}, refused {self.refused}, "
            f"{self.seconds:.2f} s"
        )


async def echo_stream(
    mux: RawMux, host: str, port: int, payload: bytes, *, within: float = 30.0
) -> EchoResult:
    """One well-behaved stream: CONNECT to an echo server, send, FIN, read it all back."""
    started = time.monotonic()
    request = preamble.encode(preamble.Connect(host, port))
    first = payload[: INITIAL_WINDOW - len(request)]
    sid = mux.open(request + first, track=True, auto_grant=True)
    stream = mux.streams[sid]
    sent = len(first)
    deadline = asyncio.get_running_loop().time() + within

    def progress() -> bool:
        return stream.rst or stream.fin or (sent < len(payload) and stream.send_window > 0)

    while not (stream.rst or stream.fin):
        if sent < len(payload) and stream.send_window > 0:
            n = min(len(payload) - sent, stream.send_window)
            mux.data(sid, payload[sent : sent + n])
            sent += n
        if sent == len(payload) and not stream.fin_sent:
            mux.fin(sid)
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0 or mux.lost:
            break
        await mux.drain()
        await mux.wait_for(progress, left)
    answer, echoed = _split_answer(bytes(stream.data))
    return EchoResult(
        sid, answer, echoed, stream.fin, stream.rst, stream.refused, time.monotonic() - started
    )


def _split_answer(data: bytes) -> tuple[preamble.Answer | preamble.Request | None, bytes]:
    if len(data) < 2:
        return None, data
    length = int.from_bytes(data[:2], "big")
    if len(data) < 2 + length:
        return None, data
    try:
        return preamble.decode(data[2 : 2 + length]), data[2 + length :]
    except preamble.PreambleError:
        return None, data
