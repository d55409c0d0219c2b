"""Turn a connected socket into an authenticated TLS 1.3 link with a known peer.

Python's ssl has no verify callback and no exporter, so authentication happens around TLS:
each side first sends a HELLO with its certificate (and in --code mode a SPAKE2 message), the
certificate is judged by local flags only, and TLS then runs with that very certificate as the
peer's only trust anchor. The side with the smaller certificate fingerprint is the TLS client,
so roles never depend on what anyone typed.

    HELLO  ->  <- HELLO      (certificate, commitment to a nonce, SPAKE2 message)
    FINISH ->  <- FINISH     (nonce, key confirmation)   or REFUSE(reason)
    TLS 1.3 handshake, both certificates required and pinned, ALPN tete/1
    READY  (server -> client), because a TLS 1.3 client learns of rejection only by reading
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import logging
import math
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tete_tunnel import hello as msg
from tete_tunnel import tlssocket, tlssuites
from tete_tunnel.carrier import Carrier
from tete_tunnel.errors import AuthenticationError, HandshakeError
from tete_tunnel.identity import Identity, fingerprint, format_id

log = logging.getLogger("tete_tunnel")

ALPN = "tete/1"
READY = b"TETE\x01RDY"  # 8 bytes, the TLS server's first application data
PREAUTH_TIMEOUT = 10.0  # HELLO to READY; a stalling stranger is dropped after this
SPAKE_ID = b"tete-tunnel/1"
# One side has --code and the other not: each side says it from where it stands, whether
# it found out itself or from the peer's REFUSE.
CODE_NOT_HERE = "the peer uses --code but we were given none: give both sides the same --code"
CODE_NOT_THERE = "the peer did not use --code: give both sides the same --code"


class Mode(enum.Enum):
    PEER_ID = "peer-id"
    CODE = "code"
    UNVERIFIED = "unverified"


@dataclass(frozen=True)
class Auth:
    """How to judge the peer: chosen from local flags, never negotiated."""

    peer_fingerprint: bytes | None = None
    code: str | None = None

    @property
    def mode(self) -> Mode:
        if self.peer_fingerprint is not None:
            return Mode.PEER_ID
        return Mode.CODE if self.code is not None else Mode.UNVERIFIED


@dataclass
class SecureLink:
    carrier: Carrier  # the TLS transport, for the session to take over
    peer_fingerprint: bytes
    peer_id: str
    is_tls_client: bool
    mode: Mode
    safety_code: str
    path: str | None = None  # "direct" or "relayed via HOST:PORT" when a relay was used


MIN_CODE_BITS = 16  # below this, even one guess per run is a real chance (1 in 65536)


def code_strength(code: str) -> float:
    """A generous estimate of a code's entropy in bits, from its length and alphabet."""
    chars = [c for c in code if c not in " -_.,"]
    alphabet = 0
    if any(c.isdigit() for c in chars):
        alphabet += 10
    if any(c.islower() for c in chars):
        alphabet += 26
    if any(c.isupper() for c in chars):
        alphabet += 26
    if any(not c.isalnum() for c in chars):
        alphabet += 32
    return len(chars) * math.log2(alphabet) if alphabet else 0.0


def safety_code(fp_a: bytes, nonce_a: bytes, fp_b: bytes, nonce_b: bytes) -> str:
    """Six digits both people can compare by voice; a man in the middle cannot match them.

    The nonces were committed to in HELLO before either was revealed, so a middleman must
    fix its own nonces before it learns ours, and then matches the codes only by luck (1e-6).
    """
    (lo_fp, lo_nonce), (hi_fp, hi_nonce) = sorted([(fp_a, nonce_a), (fp_b, nonce_b)])
    digest = hashlib.sha256(b"tete-tunnel safety code" + lo_fp + hi_fp + lo_nonce + hi_nonce)
    number = int.from_bytes(digest.digest()[:8], "big") % 1_000_000
    return f"{number // 1000:03d}-{number % 1000:03d}"


def _confirmation(key: bytes, sender_fp: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, b"tete-tunnel confirm" + sender_fp + transcript, hashlib.sha256).digest()


async def _recv_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await loop.sock_recv(sock, n - len(buf))  # never past this message
        except OSError as exc:
            raise HandshakeError(f"connection failed while reading {what}: {exc.strerror}") from exc
        if not chunk:
            raise HandshakeError(f"connection closed during the handshake (waiting for {what})")
        buf += chunk
    return bytes(buf)


async def _recv_message(sock: socket.socket, what: str) -> tuple[msg.MessageType, bytes]:
    kind, length = msg.parse_header(await _recv_exactly(sock, msg.HEADER_SIZE, what))
    return kind, await _recv_exactly(sock, length, what)


async def _send(sock: socket.socket, data: bytes) -> None:
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except OSError as exc:
        raise HandshakeError(f"connection failed during the handshake: {exc.strerror}") from exc


async def _refuse(sock: socket.socket, reason: msg.RefuseReason) -> None:
    try:
        await asyncio.get_running_loop().sock_sendall(sock, msg.encode_refuse(reason))
    except OSError:
        pass  # the peer is gone; our own error says it all


def _tls_context(identity: Identity, peer_der: bytes, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    identity.load_into(ctx)  # the key as it was checked at load, not the path again
    ctx.load_verify_locations(cadata=peer_der)  # the peer's certificate is the only anchor
    ctx.set_alpn_protocols([ALPN])
    tlssuites.prefer_aes128(ctx)  # less CPU per byte (tlssuites' docstring)
    return ctx


async def _tls(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> Carrier:
    """TLS with OpenSSL on the socket itself (tlssocket: no memory BIOs, fewer copies)."""
    carrier = Carrier()
    await tlssocket.open_transport(sock, ctx, server_side, carrier)
    return carrier


@dataclass
class Progress:
    """How far one handshake got, for the caller to judge its failure (even a timeout)."""

    code_spent: bool = False  # the peer's SPAKE2 message was used: it had its one guess
    nonce_revealed: bool = False  # our FINISH went out: a safety code was drawn with it
    peer_id: str | None = None


class Rejected(HandshakeError):
    """A well-formed peer we will not link with; `kind` groups it in the deadline summary."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class CodeGuessFailed(AuthenticationError):
    """The code exchange failed after the peer's SPAKE2 message was used: one guess is all
    anyone gets per run, so the run ends (README: "one online guess per run")."""


WRONG_CODE = (
    "a wrong code was tried ({what}). If that was not your peer, someone may be guessing it: "
    "every run allows one guess, and this one is used up. Pick a new code and start again "
    "on both sides"
)


class Arbiter:
    """Of several connections to the same peer at once (a dial of ours, one of its, two
    candidate addresses), the TLS server goes on with one at a time and with none after one
    has linked: both sides end up with the same link, and no second exchange of code
    confirmations ever happens (each would be a guess spent, docs/PROTOCOL.md §4.5)."""

    def __init__(self) -> None:
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._linked: set[bytes] = set()

    @contextlib.asynccontextmanager
    async def turn(self, peer_fp: bytes) -> AsyncIterator[bool]:
        """Our turn with this peer: True to go on, False when another link already won."""
        lock = self._locks.setdefault(peer_fp, asyncio.Lock())
        async with lock:
            yield peer_fp not in self._linked

    def linked(self, peer_fp: bytes) -> None:
        self._linked.add(peer_fp)


class Duplicate(Rejected):
    """The peer goes on with another connection of ours: this one is dropped, no harm done."""


async def secure(
    sock: socket.socket,
    identity: Identity,
    auth: Auth,
    progress: Progress | None = None,
    arbiter: Arbiter | None = None,
) -> SecureLink:
    """Authenticate the peer on `sock` and run TLS over it; the caller bounds the time.

    Raises HandshakeError for anything that is not the peer we expect, Rejected (a subclass)
    for a well-formed one we refuse or that refuses us; the caller drops these and goes on
    waiting. Raises CodeGuessFailed once the code exchange failed after a code confirmation
    went out, or a wrong one came in. `progress` records how far it got (for a failure by
    timeout too). `arbiter` is shared by the handshakes of one wait for the peer.
    """
    progress = progress if progress is not None else Progress()
    try:
        # Without one shared with other handshakes, a fresh arbiter lets this one go on.
        return await _secure(sock, identity, auth, progress, arbiter or Arbiter())
    except HandshakeError as exc:
        if progress.code_spent:
            raise CodeGuessFailed(WRONG_CODE.format(what=exc)) from exc
        raise


async def _secure(
    sock: socket.socket,
    identity: Identity,
    auth: Auth,
    progress: Progress,
    arbiter: Arbiter,
) -> SecureLink:
    my_fp = identity.fingerprint
    nonce = os.urandom(msg.NONCE_SIZE)
    spake_state = None
    spake_out = b""
    if auth.code is not None:
        import spake2  # only with a code: its tables cost memory for the life of the process

        spake_state = spake2.SPAKE2_Symmetric(auth.code.encode("utf-8"), idSymmetric=SPAKE_ID)
        spake_out = spake_state.start()
    my_hello = msg.encode_hello(
        msg.Hello(hashlib.sha256(nonce).digest(), identity.cert_der, spake_out)
    )
    await _send(sock, my_hello)
    kind, body = await _recv_message(sock, "the peer's HELLO")
    if kind == msg.MessageType.REFUSE:
        raise _refused(msg.parse_refuse(body).reason, identity)
    if kind != msg.MessageType.HELLO:
        raise HandshakeError(f"expected HELLO, got {kind.name}")
    peer_hello = msg.parse_hello(body)
    peer_der = peer_hello.cert_der
    peer_fp = fingerprint(peer_der)
    peer_id = progress.peer_id = format_id(peer_fp)
    their_hello = msg.HEADER.pack(msg.MAGIC, msg.VERSION, kind, len(body)) + body
    if hmac.compare_digest(their_hello, my_hello):  # our own nonce commitment: an echo
        raise msg.NotAPeer("it sent back exactly what we sent (an echo service?)")

    if hmac.compare_digest(peer_fp, my_fp):
        await _refuse(sock, msg.RefuseReason.SAME_IDENTITY)
        raise Rejected(
            "it presented our own identity: both peers use the same identity (same machine or "
            "same home directory?): give one of them its own with --identity DIR",
            "same-identity",
        )
    if auth.peer_fingerprint is not None and not hmac.compare_digest(
        peer_fp, auth.peer_fingerprint
    ):
        await _refuse(sock, msg.RefuseReason.ID_MISMATCH)
        raise Rejected(
            f"peer ID mismatch: expected {format_id(auth.peer_fingerprint)}, but it presented "
            f"{peer_id} (a wrong --peer-id, or someone in the middle)",
            "wrong-id",
        )
    key = b""
    transcript = b""
    if spake_state is not None:
        if not peer_hello.spake_message:
            await _refuse(sock, msg.RefuseReason.CODE_MISSING)
            raise Rejected(CODE_NOT_THERE, "code-mismatch")
        try:
            key = spake_state.finish(peer_hello.spake_message)
        except Exception as exc:  # spake2 raises assorted types for malformed points
            raise HandshakeError(f"malformed code exchange from the peer: {exc!r}") from exc
        lo, hi = sorted([(my_fp, my_hello), (peer_fp, their_hello)])
        transcript = hashlib.sha256(lo[1] + hi[1]).digest()
    elif peer_hello.spake_message:
        await _refuse(sock, msg.RefuseReason.CODE_UNEXPECTED)
        raise Rejected(CODE_NOT_HERE, "code-mismatch")
    coded = spake_state is not None
    my_finish = msg.encode_finish(
        msg.Finish(nonce, _confirmation(key, my_fp, transcript) if coded else b"")
    )

    # The TLS server speaks first, the client only once the server's FINISH has checked out:
    # so of two links at once the server's arbiter decides which one goes on, before any
    # code confirmation is sent on the other.
    server_side = my_fp > peer_fp
    if server_side:
        async with arbiter.turn(peer_fp) as go:
            if not go:
                await _refuse(sock, msg.RefuseReason.DUPLICATE)
                raise Duplicate("we link with the peer on another connection", "duplicate")
            progress.code_spent = coded  # from here on, any failure is a guess spent
            progress.nonce_revealed = True
            await _send(sock, my_finish)
            finish = await _recv_finish(sock, identity, peer_hello, key, peer_fp, transcript)
            link = await _tls_link(sock, identity, peer_der, peer_fp, server_side)
            arbiter.linked(peer_fp)
    else:
        try:
            finish = await _recv_finish(sock, identity, peer_hello, key, peer_fp, transcript)
        except _WrongConfirmation as exc:
            progress.code_spent = True  # the server tried a code on us, and it was wrong
            raise HandshakeError(str(exc)) from exc
        progress.code_spent = coded
        progress.nonce_revealed = True
        await _send(sock, my_finish)
        link = await _tls_link(sock, identity, peer_der, peer_fp, server_side)
    return SecureLink(
        carrier=link,
        peer_fingerprint=peer_fp,
        peer_id=peer_id,
        is_tls_client=not server_side,
        mode=auth.mode,
        safety_code=safety_code(my_fp, nonce, peer_fp, finish.nonce),
    )


class _WrongConfirmation(HandshakeError):
    pass


async def _recv_finish(
    sock: socket.socket,
    identity: Identity,
    peer_hello: msg.Hello,
    key: bytes,
    peer_fp: bytes,
    transcript: bytes,
) -> msg.Finish:
    kind, body = await _recv_message(sock, "the peer's FINISH")
    if kind == msg.MessageType.REFUSE:
        raise _refused(msg.parse_refuse(body).reason, identity)
    if kind != msg.MessageType.FINISH:
        raise HandshakeError(f"expected FINISH, got {kind.name}")
    finish = msg.parse_finish(body)
    if not hmac.compare_digest(hashlib.sha256(finish.nonce).digest(), peer_hello.commitment):
        raise HandshakeError("the peer's nonce does not match its commitment")
    if peer_hello.spake_message:
        expected = _confirmation(key, peer_fp, transcript)
        if not hmac.compare_digest(finish.mac, expected):
            raise _WrongConfirmation("its key confirmation does not match ours: a different code")
    return finish


async def _tls_link(
    sock: socket.socket, identity: Identity, peer_der: bytes, peer_fp: bytes, server_side: bool
) -> Carrier:
    """TLS 1.3 pinned to the HELLO's certificate, then READY: the link's carrier."""
    try:
        carrier = await _tls(sock, _tls_context(identity, peer_der, server_side), server_side)
    except (ssl.SSLError, OSError) as exc:
        raise HandshakeError(f"TLS handshake failed: {_describe(exc)}") from exc
    transport = carrier.transport
    assert transport is not None
    try:
        ssl_object = transport.get_extra_info("ssl_object")
        seen = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if seen is None or not hmac.compare_digest(fingerprint(seen), peer_fp):
            raise HandshakeError("the TLS certificate differs from the one in HELLO")
        if ssl_object.selected_alpn_protocol() != ALPN:
            raise HandshakeError(f"the peer did not agree to protocol {ALPN}")
        if server_side:
            transport.write(READY)
        elif await carrier.read_exactly(len(READY)) != READY:
            raise HandshakeError("the peer's first TLS message is not READY")
    except (ssl.SSLError, OSError) as exc:  # ConnectionError included
        transport.abort()
        raise HandshakeError(f"TLS handshake failed: {_describe(exc.__cause__ or exc)}") from exc
    except BaseException:
        transport.abort()
        raise
    return carrier


def _describe(exc: BaseException) -> str:
    """Words for an error even when it carries none (a bare ConnectionResetError())."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if str(exc):
        return str(exc)
    if isinstance(exc, ConnectionResetError):
        return "the connection was reset"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the connection was closed"
    return type(exc).__name__


def _refused(reason: int, identity: Identity) -> Rejected:
    """The other end refused us: a drop like any other, since anyone can send a REFUSE."""
    if reason == msg.RefuseReason.ID_MISMATCH:
        return Rejected(
            f"it refused us: our ID {identity.id} is not the --peer-id it was given "
            "(check the ID it has with `tete-tunnel id` on our side)",
            "refused-id",
        )
    if reason == msg.RefuseReason.CODE_MISSING:
        return Rejected(f"it refused us: {CODE_NOT_HERE}", "code-mismatch")
    if reason == msg.RefuseReason.CODE_UNEXPECTED:
        return Rejected(f"it refused us: {CODE_NOT_THERE}", "code-mismatch")
    if reason == msg.RefuseReason.DUPLICATE:
        return Duplicate("the peer goes on with another connection of ours", "duplicate")
    if reason == msg.RefuseReason.SAME_IDENTITY:
        return Rejected(
            "it refused us: both peers use the same identity: give one of them its own with "
            "--identity DIR",
            "same-identity",
        )
    return Rejected(f"it refused the connection (reason {reason})", "refused")
